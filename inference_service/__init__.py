"""The inference service: serves published MLP snapshots over gRPC and hot-loads new versions.

Start it with ``python -m inference_service``; ``__main__`` shows what starts in what order.
"""
