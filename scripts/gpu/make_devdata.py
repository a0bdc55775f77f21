"""Build `.devdata/`, the compact data copy that travels to the GPU machine (the device tool carries ≤ 64 MiB).

    python scripts/gpu/make_devdata.py SOURCE_ROOT [.devdata]

SOURCE_ROOT holds the offline mirrors (see ../shared/data/README.md). Contents of the result:
* CIFAR-10 JPEG archive, MNIST / Fashion-MNIST IDX files and the Omniglot archive, copied unchanged;
* a Tiny ImageNet archive in the official layout restricted to what the offline protocol reads (train images of
  the auxiliary classes, val images of the near-OOD classes, wnids/words/val_annotations);
* DTD decoded by oodtune's own loader to 32x32 and saved as lossless PNG in the official `dtd/images/CLASS`
  layout, so loading it yields exactly the arrays the 128 px mirror gives.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
from pathlib import Path

from PIL import Image

from oodtune.data import load_dataset
from oodtune.data.protocol import read_split


def tin_subset(src: Path, dest: Path) -> None:
    split = read_split()
    aux, near = set(split["auxiliary"]), set(split["near_ood"])
    with tarfile.open(src / "tiny-imagenet-200-32px-jpg.tar.gz") as tin, \
            tarfile.open(dest / "tiny-imagenet-200-protocol-subset.tar.gz", "w:gz") as out:
        members = tin.getmembers()
        ann = tin.extractfile("tiny-imagenet-200/val/val_annotations.txt").read().decode()
        near_val = {f"tiny-imagenet-200/val/images/{line.split()[0]}" for line in ann.splitlines()
                    if line.split()[1] in near}
        for m in members:
            parts = m.name.split("/")
            keep = (m.name in near_val or m.name.endswith(("wnids.txt", "words.txt", "val_annotations.txt"))
                    or (len(parts) > 2 and parts[1] == "train" and parts[2] in aux))
            if keep and m.isfile():
                out.addfile(m, tin.extractfile(m))


def dtd_png(src: Path, dest: Path) -> None:
    ds = load_dataset("dtd", src, "test")
    for i, (img, label) in enumerate(zip(ds.images, ds.labels, strict=False)):
        folder = dest / "dtd" / "images" / ds.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def copy_files(src: Path, dest: Path) -> None:
    """Copy a file, or a folder's files, contents only: the mirrors are read-only and the copy must not be."""
    for f in [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()):
        target = dest / f.relative_to(src) if src.is_dir() else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)


def main(src: str, dest: str = ".devdata") -> None:
    s, d = Path(src), Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    for name in ("cifar10-jpg.tar.gz", "omniglot-small.tar.gz", "mnist", "fashion-mnist"):
        copy_files(s / name, d / name)
    tin_subset(s, d)
    dtd_png(s, d)
    print(f"{d}: {sum(f.stat().st_size for f in d.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(*sys.argv[1:])
