#!/bin/sh
# `trainer` and `inference` start the matching service; any other command runs as given.
set -e
case "${1:-}" in
    trainer) shift; exec python -m trainer_service "$@" ;;
    inference) shift; exec python -m inference_service "$@" ;;
esac
exec "$@"
