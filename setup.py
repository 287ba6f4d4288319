"""lodas: latent diffusion data assimilation coupled in-line to Earth-system models."""
from setuptools import setup

setup(
    name="lodas",
    version="0.1.0",
    description="Generative (latent diffusion) data assimilation coupled to Fortran forecast models over MPI",
    packages=["coupler", "coupler.assim", "coupler.models", "coupler.io", "bridges"],
    # trained LO-SDA checkpoints (`lodas train`; coupler.io.checkpoints.shipped_checkpoint)
    package_data={"coupler": ["checkpoints/*.pt"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0", "numpy", "mpi4py", "netCDF4", "f90nml", "xarray", "scipy", "tqdm", "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
    entry_points={"console_scripts": ["lodas = coupler.cli:main"]},
)
