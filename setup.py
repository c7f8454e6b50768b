"""flexvision: JAX/Flax vision backbones that are flexible at run time."""

from setuptools import find_packages, setup

RUNTIME_REQUIREMENTS = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92",
    "ml-collections>=1.1.0",
    "absl-py>=2.0",
    "numpy>=2.0",
    "tensorflow-cpu>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10",
    "tensorboard>=2.21",
    "scikit-learn>=1.5",
    "pillow>=10",  # sklearn's sample photos -> the JPEG folders of image_folder.write_sample_folder
    "safetensors>=0.4",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "importlib-resources>=6",  # needed by tensorflow-datasets to build datasets locally
    "pycocotools>=2.0.8",  # COCO annotation files and box/mask AP
    "tifffile>=2024.1",  # reads the nuclei dataset's TIFFs
    "pillow>=10",
    "scipy>=1.11",
]

# The nuclei dataset reads two data files from the stardist wheel (never importing it); stardist
# pulls numba, llvmlite, scikit-image and csbdeep (~100 MB), so it is an extra:
# pip install "flexvision[nuclei]" (or `pip install --no-deps stardist`).
NUCLEI_REQUIREMENTS = ["stardist>=0.9"]

TEST_REQUIREMENTS = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "filelock>=3.12",  # tests/conftest.py: one trained workdir shared by the xdist workers
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
] + NUCLEI_REQUIREMENTS

setup(
    name="flexvision",
    version="0.1.0",
    description="Vision backbones in JAX/Flax that run at any resolution and patch size (FlexiViT and friends).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["flexvision", "flexvision.*"]),
    install_requires=RUNTIME_REQUIREMENTS,
    extras_require={"test": TEST_REQUIREMENTS, "nuclei": NUCLEI_REQUIREMENTS},
    entry_points={
        "console_scripts": [
            "flexvision-train=flexvision.train.__main__:run",
            "flexvision-evaluate=flexvision.evaluate:run",
            "flexvision-benchmark=flexvision.benchmark.cli:run",
        ]
    },
)
