"""load_dataset on fixtures written in each official format."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fixtures_data import (
    CIFAR10_NAMES,
    make_tar,
    make_zip,
    write_cifar10,
    write_cifar100,
    write_corrupt_jpeg,
    write_idx,
    write_image,
    write_labelled_folder,
    write_mnist,
    write_svhn,
    write_tiny_imagenet,
)
from oodtune.data import DataError, ImageSet, available_datasets, load_dataset


def test_cifar10_pickle_folder_and_official_tar_agree(data_env):
    root = data_env["root"]
    expected = write_cifar10(root)
    for split in ("train", "test"):
        ds = load_dataset("CIFAR10", root, split)
        assert isinstance(ds, ImageSet) and ds.classes == tuple(CIFAR10_NAMES)
        np.testing.assert_array_equal(ds.images, expected[split][0])
        np.testing.assert_array_equal(ds.labels, expected[split][1])
    assert len(load_dataset("cifar10", root, "train")) == 100
    tar_root = data_env["tmp"] / "tar_root"
    tar_root.mkdir()
    make_tar(root / "cifar-10-batches-py", tar_root / "cifar-10-python.tar.gz")
    ds = load_dataset("cifar10", tar_root, "test")
    np.testing.assert_array_equal(ds.images, expected["test"][0])
    assert ds.name == "cifar10"


def test_cifar10_resolution_resizes(data_env):
    write_cifar10(data_env["root"], per_batch=4)
    ds = load_dataset("cifar10", data_env["root"], "test", resolution=16)
    assert ds.images.shape == (4, 16, 16, 3)


def test_cifar10_from_jpg_mirror_layout(data_env):
    root = data_env["root"]
    for split in ("train", "test"):
        write_labelled_folder(root / "src" / "cifar10-jpg" / split, CIFAR10_NAMES, per_class=2, ext=".jpg")
    make_tar(root / "src" / "cifar10-jpg", root / "cifar10-jpg.tar.gz")
    shutil.rmtree(root / "src")
    ds = load_dataset("cifar10", root, "train")
    assert len(ds) == 20 and ds.class_counts().tolist() == [2] * 10 and ds.classes == tuple(CIFAR10_NAMES)
    assert not (root / "cifar10-jpg").exists()  # extracted into the cache, not next to the source


def test_cifar10_folder_with_wrong_classes(data_env):
    write_labelled_folder(data_env["root"] / "cifar10-jpg" / "test", ["cat", "dog"], per_class=1)
    with pytest.raises(DataError, match="class folders do not match"):
        load_dataset("cifar10", data_env["root"])


def test_cifar_missing_tells_where_and_download(data_env):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz") as exc:
        load_dataset("cifar10", data_env["root"])
    assert "download=True" in str(exc.value)


def test_cifar_download_failure_says_place_file(data_env, monkeypatch):
    import urllib.request

    def fail(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(DataError, match="place it at") as exc:
        load_dataset("cifar100", data_env["root"], download=True)
    assert "cifar-100-python.tar.gz" in str(exc.value)


def test_download_verifies_md5(tmp_path):
    from oodtune.data.download import Remote, download, md5sum

    src = tmp_path / "srv" / "file.bin"
    src.parent.mkdir()
    src.write_bytes(b"payload")
    good = Remote(src.as_uri(), md5sum(src))
    assert download(good, tmp_path / "dl").read_bytes() == b"payload"
    with pytest.raises(DataError, match="md5"):
        download(Remote(src.as_uri(), "0" * 32), tmp_path / "dl2")
    assert not any((tmp_path / "dl2").iterdir())


def test_cifar_corrupt_pickle_and_unsafe_pickle(data_env):
    root = data_env["root"]
    write_cifar10(root, per_batch=2)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", root)
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="not allowed"):
        load_dataset("cifar10", root)


def test_cifar100_fine_labels(data_env):
    expected = write_cifar100(data_env["root"])
    ds = load_dataset("cifar100", data_env["root"], "train")
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.labels, expected["train"][1])


def test_mnist_and_fashion_idx(data_env):
    root = data_env["root"]
    x, y = write_mnist(root / "mnist")
    ds = load_dataset("mnist", root)
    assert ds.images.shape == (12, 32, 32, 3) and ds.labels.tolist() == y.tolist()
    assert (ds.images[..., 0] == ds.images[..., 2]).all()
    ds28 = load_dataset("mnist", root, resolution=28)
    np.testing.assert_array_equal(ds28.images[..., 0], x)
    write_mnist(root / "fashion-mnist", prefix="train", n=10)
    fm = load_dataset("fashion_mnist", root, "train")
    assert fm.classes[0] == "T-shirt/top" and len(fm) == 10


def test_idx_validation(data_env):
    root = data_env["root"]
    x, y = write_mnist(root / "mnist")
    write_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz", y[:5])
    with pytest.raises(DataError, match="12 images but"):
        load_dataset("mnist", root)
    write_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz", x, magic=bytes([0, 0, 8, 1]))
    with pytest.raises(DataError, match="magic"):
        load_dataset("mnist", root)
    path = root / "mnist" / "t10k-images-idx3-ubyte.gz"
    write_idx(path, x, compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", root)


def test_svhn_mat_label_10_is_zero(data_env):
    x, y = write_svhn(data_env["root"] / "svhn")
    ds = load_dataset("svhn", data_env["root"], "test")
    np.testing.assert_array_equal(ds.images, x)
    assert ds.labels.tolist() == y.tolist() and 0 in ds.labels.tolist() and ds.labels.max() == 9
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset("svhn", data_env["root"], "train")


def test_tiny_imagenet_folder_and_zip(data_env):
    root = data_env["root"]
    wnids = ["n002", "n001", "n003"]  # class order = wnids.txt order, not sorted
    write_tiny_imagenet(root, wnids, train_per_class=2, val_per_class=1)
    train = load_dataset("tiny-imagenet", root, "train", resolution=8)
    assert train.classes == tuple(wnids) and train.class_counts().tolist() == [2, 2, 2]
    val = load_dataset("tiny-imagenet", root, "val", resolution=8)
    assert val.labels.tolist() == [0, 1, 2]
    assert load_dataset("tiny-imagenet", root, "test").labels is None
    zroot = data_env["tmp"] / "zroot"
    zroot.mkdir()
    make_zip(root / "tiny-imagenet-200", zroot / "tiny-imagenet-200.zip")
    zval = load_dataset("tiny-imagenet", zroot, "val", resolution=8)
    np.testing.assert_array_equal(zval.images, val.images)
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("tiny-imagenet", root, "bogus")


def test_tiny_imagenet_bad_annotation(data_env):
    t = write_tiny_imagenet(data_env["root"], ["n1", "n2"])
    (t / "val" / "val_annotations.txt").write_text("val_0.JPEG\tnX\t0\t0\t8\t8\n")
    with pytest.raises(DataError, match="val_annotations.txt:1"):
        load_dataset("tiny-imagenet", data_env["root"], "val")


def test_dtd_textures_alias_and_archive(data_env):
    root = data_env["root"]
    src = data_env["tmp"] / "build"
    write_labelled_folder(src / "dtd" / "images", ["banded", "woven"], per_class=2, size=40, ext=".jpg")
    make_tar(src / "dtd", root / "dtd-r1.0.1.tar.gz")
    ds = load_dataset("Textures", root)
    assert ds.name == "dtd" and ds.images.shape == (4, 32, 32, 3) and ds.classes == ("banded", "woven")
    assert load_dataset("dtd", root, "train").name == "dtd"  # no official split: same set, same cache entry


@pytest.mark.parametrize(
    "name,rel",
    [("lsun", "LSUN/test"), ("lsun-resize", "LSUN_resize/LSUN_resize"), ("isun", "iSUN/iSUN_patches"),
     ("places365", "places365/a"), ("omniglot", "omniglot-small/images_background_small1/Alpha/character01")],
)
def test_unlabelled_ood_folders(data_env, name, rel):
    root = data_env["root"]
    ext = ".jpeg" if name == "isun" else ".png" if name == "omniglot" else ".jpg"
    mode = "1" if name == "omniglot" else "RGB"
    for i in range(3):
        write_image(root / rel / f"im{i}{ext}", (36, 40), mode=mode, seed=i)
    ds = load_dataset(name, root)
    assert ds.labels is None and ds.images.shape == (3, 32, 32, 3) and ds.name == name


def test_unlabelled_archive(data_env):
    root = data_env["root"]
    src = data_env["tmp"] / "b"
    for i in range(2):
        write_image(src / "LSUN" / "test" / f"{i}.jpg", (36, 36), seed=i)
    make_tar(src / "LSUN", root / "LSUN.tar.gz")
    assert len(load_dataset("lsun", root)) == 2


def test_folder_and_images_prefix(data_env, tmp_path):
    root = data_env["root"]
    pics = write_labelled_folder(tmp_path / "pics", ["b", "a"], per_class=2)
    ds = load_dataset(f"folder:{pics}", root)
    assert ds.classes == ("a", "b") and ds.class_counts().tolist() == [2, 2]
    un = load_dataset(f"images:{pics}", root)
    assert un.labels is None and len(un) == 4
    archive = make_zip(pics, tmp_path / "pics.zip")
    np.testing.assert_array_equal(load_dataset(f"folder:{archive}", root).images, ds.images)
    split_root = write_labelled_folder(tmp_path / "splits" / "train", ["x", "y"], per_class=1)
    write_labelled_folder(tmp_path / "splits" / "test", ["x", "y"], per_class=2)
    assert len(load_dataset(f"folder:{split_root.parent}", root, "train")) == 2
    assert len(load_dataset(f"folder:{split_root.parent}", root, "test")) == 4


def test_corrupt_image_is_never_skipped(data_env, tmp_path):
    pics = write_labelled_folder(tmp_path / "pics", ["a", "b"], per_class=2, ext=".jpg")
    write_corrupt_jpeg(pics / "b" / "zz_broken.jpg")
    with pytest.raises(DataError, match="zz_broken.jpg"):
        load_dataset(f"folder:{pics}", data_env["root"])


def test_empty_and_layout_errors(data_env, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_dataset(f"images:{tmp_path / 'empty'}", data_env["root"])
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="class folders|directly in the labelled folder"):
        load_dataset(f"folder:{tmp_path / 'flat'}", data_env["root"])
    (tmp_path / "cls" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'cls'}", data_env["root"])
    with pytest.raises(DataError, match="no such folder"):
        load_dataset("images:/nonexistent/path", data_env["root"])
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet-21k", data_env["root"])
    with pytest.raises(DataError, match="no data found"):
        load_dataset("lsun", data_env["root"])
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("dtd", data_env["root"], "val")


def test_default_root_env(data_env, monkeypatch):
    from oodtune.data import default_data_root

    write_mnist(data_env["root"] / "mnist")
    monkeypatch.setenv("OODTUNE_DATA", str(data_env["root"]))
    assert default_data_root() == data_env["root"]
    assert len(load_dataset("mnist")) == 12


def test_available_datasets_lists_everything():
    names = available_datasets()
    for n in ["cifar10", "cifar100", "tiny-imagenet", "dtd", "mnist", "fashion-mnist", "svhn", "lsun",
              "lsun-resize", "isun", "places365", "omniglot", "gaussian", "uniform", "rademacher", "blobs",
              "tin-aux", "tin-near", "folder:PATH", "images:PATH"]:
        assert n in names and isinstance(names[n], str) and names[n]
