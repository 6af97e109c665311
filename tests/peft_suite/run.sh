#!/usr/bin/env bash
# PEFT 0.21.2's own prompt-tuning, P-tuning (PromptEncoder), multitask prompt-tuning and prefix-tuning tests,
# run three ways on local stand-in models (no hub needed):
#   plain  PEFT alone;
#   fast   after fastprompt.patch_peft() (default share_prompt_prefix=None);
#   share  the same with the shared prefix's cost rule lifted (shares wherever it is exact), on the
#          suites with decoder-only models (where sharing can apply).
# A test that passes plain and not under fastprompt is a regression: exit code 1.
#
# Usage: tests/peft_suite/run.sh [WORKDIR]   (default /tmp/fastprompt-peft-suite; about 5 minutes)
# Needs, in the Python that runs it ($PYTHON, default python): fastprompt with peft==0.21.2 (pip install -e
# ".[dev]"), and what PEFT's test modules import: pip install diffusers==0.42.1 parameterized==0.9.0 scipy==1.17.1
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/fastprompt-peft-suite}"
python="${PYTHON:-$(command -v python || command -v python3)}"
mkdir -p "$work"
cd "$work"
if [ ! -f .tests-ready ]; then  # a marker written last: an interrupted set-up starts over
    rm -rf sdist peft-0.21.2 tests
    "$python" -m pip download -q --no-deps --no-binary peft peft==0.21.2 -d sdist
    tar -xzf sdist/peft-0.21.2.tar.gz
    cp -r peft-0.21.2/tests tests
    touch tests/__init__.py
    cp "$here/peft_conftest.py" tests/conftest.py
    touch .tests-ready
fi
cp "$here"/stand_in_models.py "$here"/plugin_*.py "$here"/compare_results.py .
printf '[pytest]\n' > pytest.ini  # the rootdir here, whatever config lies above WORKDIR
if [ ! -f .models-ready ]; then
    "$python" stand_in_models.py .
    touch .models-ready
fi
rm -f results_*.xml calls_*.txt log_*.txt  # never compare a previous run's files

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$work"
suite=(tests/test_decoder_models.py tests/test_encoder_decoder_models.py
       tests/test_feature_extraction_models.py tests/test_seq_classifier.py
       tests/test_multitask_prompt_tuning.py)
# The shared prefix applies to decoder-only models only: the forced-share run takes the suites that have
# them (the others would only take fastprompt's unshared path again, as the fast run does).
share_suite=(tests/test_decoder_models.py tests/test_seq_classifier.py tests/test_multitask_prompt_tuning.py)
prompt_keywords="PromptTuning or prompt_tuning or PromptEncoder"
prefix_keywords="PrefixTuning or prefix_tuning"
run() {  # run MODE FILES... -- [plugins...]   (KEYWORDS: the tests' -k expression, default all methods)
    local mode=$1 files=()
    shift
    while [ "$1" != "--" ]; do files+=("$1"); shift; done
    shift
    "$python" -m pytest -p plugin_local_data "$@" -p no:cacheprovider -q --tb=short -o addopts="" \
        "${files[@]}" -k "${KEYWORDS:-$prompt_keywords or $prefix_keywords}" --junitxml="results_$mode.xml" \
        > "log_$mode.txt" 2>&1 || true
    echo "$mode: $(grep -E '[0-9]+ (passed|failed)' "log_$mode.txt" | tail -1)"
}
run plain "${suite[@]}" --
FASTPROMPT_CALLS_FILE=calls_fast.txt run fast "${suite[@]}" -- -p plugin_fastprompt
# share_prompt_prefix does not apply to prefix tuning (its keys/values never run through the model): the
# forced-share run takes the prompt methods only.
KEYWORDS="$prompt_keywords" FASTPROMPT_CALLS_FILE=calls_share.txt FASTPROMPT_FORCE_SHARE=1 \
    run share "${share_suite[@]}" -- -p plugin_fastprompt
echo "fast: $(cat calls_fast.txt)"
echo "share: $(cat calls_share.txt)"
status=0
# Guards against a run that tests nothing: PEFT's plain run passes hundreds of tests, fastprompt's runs
# take the fused op, and the forced run shares.
"$python" compare_results.py results_plain.xml results_fast.xml --min-passed 250 || status=1
"$python" compare_results.py results_plain.xml results_share.xml --min-passed 250 --subset || status=1
grep -q "'fused': [1-9]" calls_fast.txt || { echo "fastprompt's fused op never ran under patch_peft()"; status=1; }
grep -q "'shared': [1-9]" calls_share.txt || { echo "the forced run never shared the prompt"; status=1; }
grep -q "'prefix': [1-9]" calls_fast.txt || { echo "fastprompt's prefix path never ran under patch_peft()"; status=1; }
exit $status
