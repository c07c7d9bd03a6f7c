"""Finding the labelled images, splitting them, and fetching the default data set."""
import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field

from classify_contract.preprocessing import IMAGE_EXTENSIONS
from retrain import progress

FLOWERS_URL = "http://download.tensorflow.org/example_images/flower_photos.tgz"

# retrain.py's constant: the split depends only on a file's name, never on how
# many files there are, so adding images never moves old ones between sets.
MAX_NUM_IMAGES_PER_CLASS = 2 ** 27 - 1


@dataclass
class ImageLists:
    """Per label, the image paths of each set."""
    labels: list
    training: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    testing: dict = field(default_factory=dict)

    def sets(self):
        return {"training": self.training, "validation": self.validation, "testing": self.testing}


def which_set(file_name, validation_percentage, testing_percentage):
    """retrain.py's stable split by a hash of the file name.

    Anything after `_nohash_` in the name is ignored, so that variants of one
    photo ("cat_nohash_1.jpg", "cat_nohash_2.jpg") always land in the same set.
    """
    hash_name = re.sub(r"_nohash_.*$", "", os.path.basename(file_name))
    hashed = hashlib.sha1(hash_name.encode("utf-8")).hexdigest()
    percentage = ((int(hashed, 16) % (MAX_NUM_IMAGES_PER_CLASS + 1))
                  * (100.0 / MAX_NUM_IMAGES_PER_CLASS))
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "testing"
    return "training"


def create_image_lists(image_dirs, validation_percentage, testing_percentage):
    """Scan one subfolder per label in each of `image_dirs` (later folders add images).

    Labels are the folder names, sorted; files with other extensions are ignored.
    """
    files = {}
    for image_dir in image_dirs:
        if not os.path.isdir(image_dir):
            raise SystemExit(f"error: image directory {image_dir!r} does not exist")
        for label in sorted(os.listdir(image_dir)):
            folder = os.path.join(image_dir, label)
            if label.startswith(".") or not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name)):
                    files.setdefault(label, []).append(os.path.join(folder, name))
    labels = sorted(files)
    if len(labels) < 2:
        raise SystemExit(
            f"error: found {len(labels)} class(es) with images in {', '.join(image_dirs)}; need at least 2. "
            "--image_dir must hold one subfolder per class, each with JPEG, PNG, BMP, GIF or WebP files.")
    lists = ImageLists(labels)
    sets = lists.sets()
    for label in labels:
        for image_set in sets.values():
            image_set[label] = []
        for path in files[label]:
            sets[which_set(path, validation_percentage, testing_percentage)][label].append(path)
    return lists


def images_in(folder):
    """The image files anywhere under `folder`, sorted (e.g. --tflite_calibration_dir's)."""
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise SystemExit(f"error: no JPEG, PNG, BMP, GIF or WebP file in {folder}")
    return found


def maybe_download_flowers(dest_dir, url=FLOWERS_URL):
    """Download and unpack TensorFlow's flower_photos.tgz into `dest_dir` unless it is there."""
    if os.path.isdir(dest_dir):
        return dest_dir
    parent = os.path.dirname(os.path.abspath(dest_dir))
    os.makedirs(parent, exist_ok=True)
    print(f"{dest_dir} is absent: downloading {url}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".flower_photos.") as tmp:
        archive = os.path.join(tmp, "flower_photos.tgz")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with progress.bar(total=total, unit="B", unit_scale=True, desc="flower_photos.tgz") as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        bar.update(len(block))
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (OSError, tarfile.TarError) as exc:
            raise SystemExit(
                f"error: could not download {url}: {exc}\n"
                "Offline? Pass --image_dir DIR with one subfolder of images per class.") from None
        # Rename into place only once complete: a half-unpacked folder is never used.
        shutil.move(os.path.join(tmp, "flower_photos"), dest_dir)
    return dest_dir
