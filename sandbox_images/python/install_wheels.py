"""Install wheels offline with the standard library only (no pip needed).

    python3 install_wheels.py WHEEL_DIR [TARGET_DIR]

A wheel is a zip file: its contents go into TARGET_DIR (default: the
interpreter's purelib directory, which is on ``sys.path``); ``*.data/purelib``
and ``*.data/platlib`` are merged in, scripts and headers are skipped (a sandbox
never runs console scripts).  The installed files are then byte-compiled, since
the sandbox's root filesystem is read-only at run time.
"""

import compileall
import os
import shutil
import sys
import sysconfig
import zipfile


def install(wheel, target):
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            parts = name.split("/")
            if ".." in parts or name.startswith("/"):
                raise SystemExit("refusing unsafe path %r in %s" % (name, wheel))
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            if info.is_dir() or not parts or not parts[-1]:
                continue
            dest = os.path.join(target, *parts)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, 0o755 if mode & 0o111 else 0o644)


def main(argv):
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    source = argv[1]
    target = argv[2] if len(argv) == 3 else sysconfig.get_paths()["purelib"]
    os.makedirs(target, exist_ok=True)
    wheels = sorted(f for f in os.listdir(source) if f.endswith(".whl"))
    if not wheels:
        raise SystemExit("no wheels in %s" % source)
    for name in wheels:
        install(os.path.join(source, name), target)
        print("installed", name)
    compileall.compile_dir(target, quiet=1, workers=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
