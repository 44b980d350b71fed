"""The sandbox images' build files, shipped with agentkeel as the package data
``agentkeel.sandbox_images`` (this folder is mapped there in pyproject.toml).

No code: ``agentkeel.sandbox.docker.images.images_dir()`` finds this folder and
``agentkeel sandbox build`` builds from it. See README.md here.
"""
