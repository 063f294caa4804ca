#!/usr/bin/env bash
# Builds, with no image registry, what deploy/Dockerfile needs: two Debian bookworm base images made
# with debootstrap and imported into Docker, and a wheelhouse of the project and its runtime
# dependencies at deploy/.build/wheels. Re-running skips images that already exist.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/build_bases.sh [--force] [--wheels-only | --bases-only]

  --force        rebuild the debootstrap root file system and re-import images that already exist
  --wheels-only  only build deploy/.build/wheels (all an online user needs)
  --bases-only   only build the base images

environment:
  DEBIAN_MIRROR           Debian archive (default: this machine's apt source for bookworm)
  DEBIAN_SECURITY_MIRROR  security archive (default: this machine's apt source for bookworm-security)
  PYTHON_BASE_IMAGE       default mnist-base/python:3.11-bookworm
  REDIS_BASE_IMAGE        default mnist-base/redis:7-bookworm
  PYTHON                  interpreter (3.11 or newer) that runs pip for the wheelhouse, default python3
  TARGET_PYTHON           Python version the wheelhouse is for, default 3.11.2 (bookworm's python3)
EOF
}

SUITE=bookworm
PYTHON_BASE_IMAGE=${PYTHON_BASE_IMAGE:-mnist-base/python:3.11-bookworm}
REDIS_BASE_IMAGE=${REDIS_BASE_IMAGE:-mnist-base/redis:7-bookworm}
PYTHON=${PYTHON:-python3}
TARGET_PYTHON=${TARGET_PYTHON:-3.11.2} # bookworm's python3; python:3.11-slim has a later 3.11.x
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=$REPO_ROOT/deploy/.build
ROOTFS_DIR=$BUILD_DIR/rootfs
MINBASE=$ROOTFS_DIR/$SUITE-minbase

force=0
build_bases=1
build_wheels=1
for arg in "$@"; do
    case $arg in
        --force) force=1 ;;
        --wheels-only) build_bases=0 ;;
        --bases-only) build_wheels=0 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

log() { printf '[build_bases %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The archive this machine's apt already reaches for a suite (sources.list or deb822, same answer).
apt_source_for() {
    command -v apt-get >/dev/null || return 0
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
        awk -v suite="$1" '$2 == suite { sub(/\/$/, "", $1); print $1; exit }'
}

# debootstrap fetches with wget and the chroot's apt reads the environment, so an apt proxy is
# handed to both as http_proxy / https_proxy.
export_apt_proxy() {
    local APT_HTTP_PROXY='' APT_HTTPS_PROXY=''
    command -v apt-config >/dev/null || return 0
    eval "$(apt-config shell APT_HTTP_PROXY Acquire::http::Proxy APT_HTTPS_PROXY Acquire::https::Proxy)"
    if [[ -n $APT_HTTP_PROXY && $APT_HTTP_PROXY != DIRECT && -z ${http_proxy:-} ]]; then
        export http_proxy=$APT_HTTP_PROXY
        log "using apt's http proxy $http_proxy"
    fi
    if [[ -n $APT_HTTPS_PROXY && $APT_HTTPS_PROXY != DIRECT && -z ${https_proxy:-} ]]; then
        export https_proxy=$APT_HTTPS_PROXY
        log "using apt's https proxy $https_proxy"
    fi
}

# This machine's apt accepts Release files past their Valid-Until date (as a snapshot mirror needs);
# apt inside the root file system is told the same.
apt_update_options() {
    local VALID_UNTIL=''
    command -v apt-config >/dev/null || return 0
    eval "$(apt-config shell VALID_UNTIL Acquire::Check-Valid-Until)"
    [[ $VALID_UNTIL == false ]] && echo '-o Acquire::Check-Valid-Until=false'
    return 0
}

# Anything still mounted under a root file system (proc, or a /dev bind mount) would be deleted
# along with it, or be copied into an image; these two keep that from ever happening.
mounts_under() {
    local dir
    dir=$(realpath -m "$1")
    findmnt -rn -o TARGET | awk -v d="$dir" 'index($0, d "/") == 1 || $0 == d'
}

remove_tree() {
    [[ -e $1 ]] || return 0
    [[ -z $(mounts_under "$1") ]] || die "refusing to delete $1: something is mounted inside it"
    rm -rf --one-file-system -- "$1"
}

unmount_all_under() {
    local target
    while read -r target; do
        [[ -n $target ]] && umount -l "$target"
    done < <(mounts_under "$1" | sort -r)
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

image_size() { docker image inspect --format '{{.Size}}' "$1" | awk '{ printf "%.1f MB", $1 / 1e6 }'; }

# A fresh machine (CI's too) may lack debootstrap; Debian's own package is all it takes.
ensure_debootstrap() {
    command -v debootstrap >/dev/null && return 0
    command -v apt-get >/dev/null || die "debootstrap is not installed and there is no apt-get"
    log "installing debootstrap with apt-get"
    apt-get update -q >&2 || die "apt-get update failed; install debootstrap by hand"
    DEBIAN_FRONTEND=noninteractive apt-get install -qy --no-install-recommends debootstrap >&2 ||
        die "could not install debootstrap"
}

build_minbase() {
    if [[ -f $MINBASE/.complete && $force == 0 ]]; then
        log "reusing $MINBASE"
        return
    fi
    ensure_debootstrap
    local started=$SECONDS tmp=$MINBASE.partial
    remove_tree "$tmp"
    remove_tree "$MINBASE"
    mkdir -p "$ROOTFS_DIR"
    log "debootstrap --variant=minbase $SUITE from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --arch=amd64 --include=ca-certificates \
        "$SUITE" "$tmp" "$DEBIAN_MIRROR"
    unmount_all_under "$tmp"
    # Same mirror inside the image, plus updates and security fixes that the upgrade below applies.
    rm -f "$tmp/etc/apt/sources.list"
    cat >"$tmp/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # What Debian's own container images carry: no documentation or translations on later installs,
    # no package caches left behind, and no services started by maintainer scripts.
    cat >"$tmp/etc/dpkg/dpkg.cfg.d/docker-minimal" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
    cat >"$tmp/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT::Install-Recommends "false";
Acquire::Languages "none";
EOF
    printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
    chmod 0755 "$tmp/usr/sbin/policy-rc.d"
    touch "$tmp/.complete"
    mv "$tmp" "$MINBASE"
    log "minbase ready in $((SECONDS - started)) s"
}

# Runs a command inside a root file system with /proc and the host's DNS, and undoes both after.
in_rootfs() {
    local root=$1
    shift
    mount -t proc proc "$root/proc"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    local status=0
    chroot "$root" /usr/bin/env -i PATH=$IMAGE_PATH DEBIAN_FRONTEND=noninteractive \
        LANG=C.UTF-8 http_proxy="${http_proxy:-}" https_proxy="${https_proxy:-}" "$@" || status=$?
    umount "$root/proc"
    : >"$root/etc/resolv.conf"
    return "$status"
}

# Leaves only what a container needs: Docker supplies /dev, /proc, hostname and resolv.conf.
slim_rootfs() {
    local root=$1
    [[ -z $(mounts_under "$root") ]] || die "$root still has mounts; not slimming it"
    rm -rf "$root/.complete" "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
        "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old "$root"/tmp/* "$root"/var/tmp/* \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    find "$root/var/log" -type f -delete
    find "$root/dev" -mindepth 1 -delete
    : >"$root/etc/hostname"
}

# make_base IMAGE "PACKAGES" "SHELL COMMAND RUN AFTER THE INSTALL" [docker import --change ...]
make_base() {
    local image=$1 packages=$2 after_install=$3
    shift 3
    if image_exists "$image" && [[ $force == 0 ]]; then
        log "$image exists ($(image_size "$image")), skipping (--force rebuilds)"
        return
    fi
    local started=$SECONDS root
    root=$ROOTFS_DIR/$(tr '/:' '__' <<<"$image")
    remove_tree "$root"
    cp -a "$MINBASE" "$root"
    log "$image: installing $packages"
    in_rootfs "$root" sh -c "apt-get update -q $(apt_update_options) && apt-get upgrade -qy \
        && apt-get install -qy $packages && $after_install"
    slim_rootfs "$root"
    log "$image: root file system is $(du -sh "$root" | cut -f1), importing"
    tar --numeric-owner -C "$root" -c . |
        docker import --message "debootstrap $SUITE minbase + $packages" "$@" - "$image" >/dev/null
    remove_tree "$root"
    log "$image: $(image_size "$image") in $((SECONDS - started)) s"
}

build_base_images() {
    command -v docker >/dev/null || die "docker is not installed"
    # Checked before the root test, so that anyone in the docker group can re-run the script.
    if image_exists "$PYTHON_BASE_IMAGE" && image_exists "$REDIS_BASE_IMAGE" && [[ $force == 0 ]]; then
        log "both base images exist: $PYTHON_BASE_IMAGE ($(image_size "$PYTHON_BASE_IMAGE")) and" \
            "$REDIS_BASE_IMAGE ($(image_size "$REDIS_BASE_IMAGE")); --force rebuilds them"
        return
    fi
    [[ $(id -u) == 0 ]] || die "debootstrap and chroot need root"
    DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(apt_source_for "$SUITE")}
    DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(apt_source_for "$SUITE-security")}
    DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
    log "Debian mirror $DEBIAN_MIRROR, security mirror $DEBIAN_SECURITY_MIRROR"
    export_apt_proxy
    trap 'unmount_all_under "$ROOTFS_DIR"' EXIT
    build_minbase
    # python3-venv brings ensurepip, so a venv gets pip without Debian's python3-pip.
    make_base "$PYTHON_BASE_IMAGE" "python3 python3-venv" "python3 --version" \
        --change "ENV PATH=$IMAGE_PATH" --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]'
    # /data owned by redis, as in the official redis image, so a compose file serves either image.
    make_base "$REDIS_BASE_IMAGE" "redis-server" "install -d -o redis -g redis -m 0750 /data" \
        --change "ENV PATH=$IMAGE_PATH" --change 'ENV LANG=C.UTF-8' --change 'USER redis' \
        --change 'WORKDIR /data' --change 'EXPOSE 6379' --change 'CMD ["redis-server"]'
}

# pip evaluates environment markers against the interpreter that runs it, whatever --python-version
# says; redis wants async-timeout below Python 3.11.3 and bookworm has 3.11.2. So pip runs believing
# it is the target interpreter.
pip_as_target() {
    "$PYTHON" - "$TARGET_PYTHON" "$@" <<'EOF'
import platform
import runpy
import sys

version = sys.argv[1]
platform.python_version = lambda: version
platform.python_version_tuple = lambda: tuple(version.split("."))
sys.argv = ["pip", *sys.argv[2:]]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
EOF
}

# Runtime dependencies come from pyproject.toml at run time, so the wheelhouse follows it.
build_wheelhouse() {
    local started=$SECONDS wheels=$BUILD_DIR/wheels tmp=$BUILD_DIR/wheels.partial src=$BUILD_DIR/src
    local -a deps platforms=()
    mapfile -t deps < <("$PYTHON" - "$REPO_ROOT/pyproject.toml" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
    )
    # pip does not widen a manylinux tag to older ones, so every glibc up to bookworm's 2.36 is named.
    local minor
    for minor in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
    remove_tree "$tmp"
    mkdir -p "$tmp"
    log "wheelhouse: downloading for Python $TARGET_PYTHON: ${deps[*]}"
    pip_as_target download --quiet --dest "$tmp" --only-binary=:all: \
        --implementation cp --python-version "$TARGET_PYTHON" --abi cp311 "${platforms[@]}" "${deps[@]}"
    # The project is built from a copy so that setuptools' build/ and *.egg-info stay out of the tree.
    # Others edit the tree meanwhile: tar's status 1 (a file changed while read) is not a failure.
    remove_tree "$src"
    mkdir -p "$src"
    {
        tar -C "$REPO_ROOT" -c --warning=no-file-changed --warning=no-file-removed \
            --exclude=./.git --exclude=./deploy --exclude=./tests --exclude=./runs \
            --exclude=./build --exclude=./dist --exclude=./.venv --exclude='*.egg-info' \
            --exclude=__pycache__ --exclude='.*_cache' . || [[ $? == 1 ]]
    } | tar -C "$src" -x
    log "wheelhouse: building the project wheel"
    # A fixed timestamp makes the wheel byte-identical while the sources are, so docker build's
    # cache of the install layer survives a re-run.
    SOURCE_DATE_EPOCH=315532800 "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$tmp" "$src"
    remove_tree "$src"
    remove_tree "$wheels"
    mv "$tmp" "$wheels"
    log "wheelhouse: $(find "$wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$wheels" | cut -f1)," \
        "in $((SECONDS - started)) s"
    find "$wheels" -name '*.whl' -printf '  %f\n' | sort >&2
}

main() {
    if [[ $build_bases == 1 ]]; then
        build_base_images
    fi
    if [[ $build_wheels == 1 ]]; then
        build_wheelhouse
    fi
    if [[ $build_bases == 1 ]]; then
        log "images:"
        docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' |
            grep -F -e "$PYTHON_BASE_IMAGE" -e "$REDIS_BASE_IMAGE" >&2
    fi
    return 0
}

main
