from setuptools import find_packages, setup

setup(
    name="memdiag",
    version="0.1.0",
    description="Memory diagnostics for DeepSpeed ZeRO-3 training: plan, record, explain",
    python_requires=">=3.10",
    packages=find_packages(include=["memdiag", "memdiag.*", "cases", "cases.*"]),
    package_data={"cases": ["*/conf/*.yaml", "*/conf/*/*.yaml", "*/*.json"]},
    # ranges, so memdiag installs beside the user's own torch (a CUDA build), DeepSpeed and
    # transformers; the exact versions of the reference environment are in constraints.txt
    install_requires=[
        "torch>=2.2",
        "deepspeed>=0.14",
        "transformers>=4.57",
        "safetensors>=0.4",
        "hydra-core>=1.3",
        "numpy>=1.26",
        "psutil>=5.9",
        # version ranges checked against memdiag's own metadata (memdiag.versions)
        "packaging>=23",
        # 12.535.77 reads current drivers' process lists right (earlier releases misread them)
        "nvidia-ml-py>=12.535.77",
        "py-spy>=0.3.14",
        "plotly>=5.20",
        # reading hour-long 16-rank timelines inside the report's 10 s budget
        "orjson>=3.9",
        # plotly's own static export (the system Chromium draws the PNGs of report --markdown)
        "kaleido>=1.0",
        # memdiag top's terminal view
        "rich>=13",
        # which lines held the host memory at a phase's peak (stacks=); Linux and macOS wheels
        "memray>=1.11; sys_platform != 'win32'",
        # the node watcher's live metrics for a cluster's Prometheus (metrics_port=)
        "prometheus-client>=0.17",
        # long runs' timelines as Parquet (zstd) that pandas, polars and DuckDB read directly
        "pyarrow>=14",
    ],
    extras_require={"test": ["pytest>=8", "accelerate>=1.0"]},
    entry_points={"console_scripts": ["memdiag=memdiag.cli:main"]},
)
