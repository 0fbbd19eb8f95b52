#!/bin/sh
# Install a requirements file into the active virtualenv from a wheelhouse that lives in a build cache
# mount, downloading only the wheels it lacks (a rebuild of a requirements step downloads nothing).
#
#   wheelhouse.sh ROOT REQUIREMENTS [TORCH_REQUIREMENTS TORCH_INDEX_URL]
#
# TORCH_REQUIREMENTS (the torch/torchvision pins) are fetched from TORCH_INDEX_URL only (the CPU or a
# CUDA flavour), everything else from the default index. The wheels go to one folder of ROOT per torch
# index (ROOT/torch-<hash of the URL>; ROOT/pypi without torch): `pip install --no-index` picks the
# highest version it finds, and 2.14.1+cu128 outranks 2.14.1+cpu.
#
# Written by hand because pip keeps downloaded wheels only in its HTTP cache, which obeys the index's
# Cache-Control headers: behind an egress proxy that strips them (this project's build machine) pip's
# cache stays empty and every re-run downloaded the ~3 GB of torch wheels again. `pip wheel` skips a
# file already in its wheel directory and builds wheels of sdists, so `--no-index` can install them.
set -eu
[ "$#" -eq 2 ] || [ "$#" -eq 4 ] || { echo "usage: $0 ROOT REQUIREMENTS [TORCH_REQUIREMENTS TORCH_INDEX_URL]" >&2; exit 2; }
requirements=$2
house=$1/pypi
if [ "$#" -eq 4 ]; then
  key=$(printf %s "$4" | sha256sum | cut -c1-12)
  [ -n "$key" ] || { echo "wheelhouse: cannot hash the torch index URL" >&2; exit 1; }
  house=$1/torch-$key
fi
mkdir -p "$house"

offline_install() {
  pip install --no-index --find-links "$house" -r "$requirements"
}

# Everything already in the wheelhouse: install without touching the network. pip resolves before it
# installs anything, so a miss leaves the virtualenv as it was.
if offline_install >/tmp/wheelhouse-offline.log 2>&1; then
  echo "wheelhouse: $requirements installed from $house, nothing downloaded"
  exit 0
fi
echo "wheelhouse: $house lacks wheels for $requirements; fetching only the missing ones"
if [ "$#" -eq 4 ]; then
  pip wheel --no-deps --wheel-dir "$house" --index-url "$4" -r "$3"
fi
# The torch wheels just fetched are found in HOUSE (--find-links) and outrank the default index's
# plain version (a local label such as +cpu sorts higher), so their dependencies come from there.
pip wheel --wheel-dir "$house" --find-links "$house" -r "$requirements"
offline_install
