# What the GPU scripts (gpu-check.sh, gpu-pretrain.sh) share: the wheels they carry to a GPU machine
# with no network, how to fetch them here, and how they are put on the path there. Sourced, not run.

gpu_wheels=wheelhouse/gpu-check
# Only what the GPU machine's image lacks (its package list: torch, accelerate, safetensors, tokenizers,
# numpy, pillow, pyyaml, tqdm, regex... are there), and peft and transformers at the tested pins (its
# transformers is 5.17); typing-extensions and zipp at the versions pydantic and importlib-metadata need;
# redis, which the config module imports through the wire schemas. Every Requires-Dist of these wheels
# is in the image or in this list.
gpu_carried=(diffusers==0.42.1 peft==0.21.2 transformers==5.24.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 importlib-metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2
  redis==8.1.0)

# gpu_download PYTHON: the wheels into $gpu_wheels, here, where a package index is reachable, built for
# the GPU machine's Python (CPython 3.12, manylinux x86_64), not this one's
gpu_download() {
  mkdir -p "$gpu_wheels"
  "$1" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$gpu_wheels" "${gpu_carried[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "$(ls "$gpu_wheels"/*.whl | wc -l) wheels, $(du -sh "$gpu_wheels" | cut -f1) in $gpu_wheels"
}

# gpu_site PYTHON: on the GPU machine, the carried wheels installed into a folder of their own (outside
# the run's output), without resolving: everything else is the image's. Prints the folder, for PYTHONPATH.
# (Not a venv: the image's python is itself a venv, whose packages a nested venv would not see.)
gpu_site() {
  [ -d "$gpu_wheels" ] || {
    echo "$gpu_wheels is missing: run scripts/gpu-check.sh --download where an index is reachable, and carry it" >&2
    return 2
  }
  local site
  site=$(mktemp -d)/site
  "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$gpu_wheels"/*.whl >&2
  PYTHONPATH="$site:$PYTHONPATH" "$1" -c "import torch, diffusers, peft, transformers; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'on', torch.cuda.get_device_name())" >&2
  echo "$site"
}

# gpu_begin NAME OUT MODE: what both scripts do first: OUT/NAME.log gets everything printed from here
# on, the run is offline and imports the project from the tree, and the log says what ran where
gpu_begin() {
  mkdir -p "$2"
  exec > >(tee "$2/$1.log") 2>&1
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "$1 ($3) $(date -u +%FT%TZ) on $(hostname), out $2"
}
