# Source on the air-gapped box, in the repository's root, with the bundle that
# training/recipes/offline_pack.sh wrote in BUNDLE (bundle.tgz or its parts):
#   BUNDLE=/root/stash source training/recipes/offline_env.sh
# It unpacks into BOX (default /tmp/box), installs the wheels there, and exports PATH,
# LD_LIBRARY_PATH, ESPEAK_DATA_PATH, PYTHONPATH and SPEECHCHAT for one_box.sh, and SENTENCES.
: "${BUNDLE:?set BUNDLE to the folder holding bundle.tgz or its parts}" "${BOX:=/tmp/box}"
if [ ! -d "$BOX/tts" ]; then
  mkdir -p "$BOX"
  if [ -f "$BUNDLE/bundle.tgz" ]; then
    tar -C "$BOX" -xzf "$BUNDLE/bundle.tgz"
  else
    cat "$BUNDLE"/bundle.tgz.part-* | tar -C "$BOX" -xzf -
  fi
  if compgen -G "$BOX/wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$BOX/site" \
      "$BOX"/wheels/*.whl
  fi
fi
export PATH="$BOX/tts/bin:$PATH"
export LD_LIBRARY_PATH="$BOX/tts/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ESPEAK_DATA_PATH="$BOX/tts"  # the folder that holds espeak-ng-data
export PYTHONPATH="$BOX/site:$BOX/models:$PWD${PYTHONPATH:+:$PYTHONPATH}"
SENTENCES=$(echo "$BOX"/sentences.*)
export SPEECHCHAT="python3 -m model.cli" PYTHON=python3 SENTENCES
espeak-ng --version && flite -lv
