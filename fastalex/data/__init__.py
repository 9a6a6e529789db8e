"""fastalex.data: Fashion-MNIST, ImageNet-style image folders and the paper's image pipeline.

    from fastalex.data import FashionMNIST, ImageFolder, transforms as T
    train = FashionMNIST("train", image_size=227, augment=True)          # finds or downloads the IDX files
    val = ImageFolder("imagenet", "val", transform=T.paper_eval_transform(227))
    probs = T.ten_crop_predict(model, T.paper_ten_crop_transform(227)(pil_image))

fashion_mnist.py  finding / downloading / loading Fashion-MNIST, and its Dataset
idx.py            the IDX file format
folder.py         root/<split>/<class>/<image> folders, decoded with Pillow
store.py          `fastalex prepare`'s store (uint8 256x256 shards, memory-mapped) and BatchedStore, its batches for the Trainer
transforms.py     short side 256, crops, flips, PCA colour noise, normalisation, ten-crop
splits.py         load_for_training(name, ...): the train / val / test Datasets of a run
errors.py         DataError, the base of every error raised here
"""

from fastalex.data import store, transforms
from fastalex.data.errors import DataError, DatasetNotFoundError, NotAFolderError
from fastalex.data.fashion_mnist import (
    CLASSES, ChecksumError, DownloadError, FashionMNIST, default_cache_dir, download_fashion_mnist,
    find_fashion_mnist, load_fashion_mnist,
)
from fastalex.data.folder import IMG_EXTENSIONS, ImageFolder, UnreadableImageError, collate_skip_unreadable, load_image
from fastalex.data.idx import IDXError, parse_idx, read_idx
from fastalex.data.splits import DATASETS, load_for_training
from fastalex.data.store import BatchedStore, PreparedStore, augment_batch, draw_augmentation, is_store

__all__ = [
    "CLASSES", "ChecksumError", "DATASETS", "DataError", "DatasetNotFoundError", "DownloadError", "FashionMNIST",
    "IDXError", "IMG_EXTENSIONS", "ImageFolder", "NotAFolderError", "UnreadableImageError", "collate_skip_unreadable",
    "default_cache_dir", "download_fashion_mnist", "find_fashion_mnist", "load_fashion_mnist", "load_for_training",
    "load_image", "parse_idx", "read_idx", "transforms",
    "store", "BatchedStore", "PreparedStore", "augment_batch", "draw_augmentation", "is_store",
]
