#!/usr/bin/env bash
# usage: sdk_out_of_tree.sh BUILD_DIR WORK_DIR
# Installs the build into WORK_DIR/prefix, copies the installed template out of tree, builds it
# with find_package(Loom), and checks that the installed `loom` lists and runs it.
set -euo pipefail
build=$1
work=$2
rm -rf "$work"
mkdir -p "$work"
prefix=$work/prefix
cmake --install "$build" --prefix "$prefix" > "$work/install.log"

# The installed SDK carries the template; an author copies it somewhere of their own.
cp -r "$prefix/share/loom/sdk/template" "$work/my-plugin"
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
cmake -S "$work/my-plugin" -B "$work/my-plugin/build" "${generator[@]}" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_BUILD_TYPE=Release > "$work/configure.log"
cmake --build "$work/my-plugin/build" > "$work/build.log"
plugin=$(ls "$work"/my-plugin/build/libloom-template.so)

# Only loom_plugin_entry is exported.
exported=$(nm -D --defined-only "$plugin" | awk '$2 == "T" {print $3}')
[ "$exported" = "loom_plugin_entry" ] || { echo "FAIL: exported symbols: $exported"; exit 1; }

loom=$prefix/bin/loom
LOOM_PLUGIN_PATH="$work/my-plugin/build" "$loom" plugins --json > "$work/plugins.json"
grep -q '"name": "template-greedy-above"' "$work/plugins.json" || { echo "FAIL: template not listed"; exit 1; }
grep -q '"name": "greedy"' "$work/plugins.json" || { echo "FAIL: installed builtins not listed"; exit 1; }

cat > "$work/manifest.toml" <<'TOML'
[loom]
plugin_paths = ["my-plugin/build"]
[run]
steps = 6
[attention]
use = "sdpa"
[[sampler]]
use = "template-greedy-above"
floor = 0.5
[[sampler]]
use = "dist"
TOML
out=$("$loom" run "$work/manifest.toml")
echo "$out"
grep -q "6 tokens in" <<< "$out" || { echo "FAIL: the template plugin did not run"; exit 1; }
grep -q "template-greedy-above 0.1.0" <<< "$out" || { echo "FAIL: the pipeline does not show the template"; exit 1; }
# A bad value for its parameter is caught by the host from the plugin's declaration.
if "$loom" validate "$work/manifest.toml" --set 'sampler[0].floor="high"' 2> "$work/err.txt"; then
  echo "FAIL: a string floor was accepted"; exit 1
fi
grep -q 'sampler\[0\].floor: expected a number, got a string' "$work/err.txt" || { cat "$work/err.txt"; exit 1; }
# A value of the right type that the plugin refuses (set_config_error) is reported at its line.
sed 's/^floor = 0.5$/floor = nan/' "$work/manifest.toml" > "$work/nan.toml"
if "$loom" run "$work/nan.toml" 2> "$work/err.txt"; then
  echo "FAIL: floor = nan was accepted"; exit 1
fi
grep -q 'nan.toml:9:9: sampler\[0\].floor (template-greedy-above from libloom-template.so): create failed: ' \
  "$work/err.txt" || { cat "$work/err.txt"; exit 1; }
echo "sdk_out_of_tree: passed"
