# Source me on the GPU machine: installs the carried bitsandbytes wheel (the image has none) and puts the repo
# on the path. Usage: . benchmarks/gpu_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "could not install the carried wheels in .whl/"; return 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', b.__version__)"
