"""ImageNet-1k class names and CLIP's prompt templates, bundled for zero-shot classification.

    from visrep.data.imagenet import IMAGENET, template_set
    clf = zero_shot_classifier(model, tokenizer, IMAGENET.classnames, template_set("openai_imagenet"))

The data (``imagenet_metadata.json``, written by ``tools/make_imagenet_metadata.py``): the 1000 synset ids
in class-index order, WordNet lemmas, the cleaned class names and the 80 prompt templates of OpenAI's CLIP
zero-shot notebook (Radford et al. 2021, arXiv:2103.00020), and the paper's 7-template subset. In the CLIP
recipe: ``--data.classnames imagenet`` and ``--data.zero-shot-templates openai_imagenet``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Optional, Sequence

from visrep.checks import ConfigError
from visrep.errors import DataError, MissingFileError

_FILE = Path(__file__).with_name("imagenet_metadata.json")


@dataclasses.dataclass(frozen=True)
class ImageNetClasses:
    wnids: tuple[str, ...]
    lemmas: tuple[str, ...]
    classnames: tuple[str, ...]
    templates: dict

    def names_for(self, labels: Sequence[str]) -> list[str]:
        """CLIP class names for a dataset's label names, in the dataset's order.

        Label names that are synset ids (an ImageFolder of ImageNet or of a subset such as Imagenette) are
        looked up by id. Otherwise the labels must be all 1000 classes in ImageNet's index order (a Hugging
        Face ``imagenet-1k`` ClassLabel, checked against the WordNet lemmas), and are replaced index by index; no
        label names at all (integer labels) are taken as ImageNet's class indices."""
        labels = [str(x) for x in labels]
        if not labels:  # integer labels without names: taken as ImageNet's class indices
            return list(self.classnames)
        index = {w: i for i, w in enumerate(self.wnids)}
        if labels and all(x in index for x in labels):
            return [self.classnames[index[x]] for x in labels]
        if len(labels) == len(self.classnames) and self._same_classes(labels):
            return list(self.classnames)
        unknown = [x for x in labels if x not in index][:3]
        raise DataError(f"data.classnames 'imagenet' needs label names that are ImageNet synset ids (n01440764, ...) "
                         f"or all 1000 ImageNet classes in index order; got {len(labels)} labels such as {unknown}. "
                         f"Give the class names yourself (a file with one name per line) instead.")


    def _same_classes(self, labels: Sequence[str]) -> bool:
        """Whether 1000 label names are ImageNet's in index order: each label's first name (before a comma)
        is the synset's first WordNet lemma or its CLIP name (case-insensitive), for all but a few."""
        def first(x: str) -> str:
            return x.split(",")[0].strip().lower()

        hits = sum(first(a) in (first(b), c.lower()) for a, b, c in zip(labels, self.lemmas, self.classnames))
        return hits >= 0.95 * len(labels)


@functools.lru_cache(maxsize=1)
def _load() -> ImageNetClasses:
    d = json.loads(_FILE.read_text())
    return ImageNetClasses(tuple(d["wnids"]), tuple(d["lemmas"]), tuple(d["classnames"]), d["templates"])


def __getattr__(name):  # IMAGENET is read from the JSON file on first use, not at import
    if name == "IMAGENET":
        return _load()
    raise AttributeError(name)


TEMPLATE_SETS = ("openai_imagenet", "simple_imagenet")


def template_set(name: str) -> list[str]:
    """The named bundled template set (``TEMPLATE_SETS``), each template with one ``{}``."""
    if name not in TEMPLATE_SETS:
        raise ConfigError(f"unknown template set '{name}'; bundled sets: {', '.join(TEMPLATE_SETS)}")
    return list(_load().templates[name])


def expand_templates(templates: Sequence[str]) -> list[str]:
    """``templates`` with each bundled set's name replaced by its templates (others kept as given)."""
    out: list[str] = []
    for t in templates:
        out.extend(template_set(t) if t in TEMPLATE_SETS else [t])
    return out


def read_classnames(spec: str, label_names: Optional[Sequence[str]]) -> list[list[str]]:
    """Zero-shot names per class from ``data.classnames``: ``imagenet`` (the bundled names, matched to the
    label names), or a text file with one class per line in label-id order (synonyms separated by ``|``)."""
    if spec == "imagenet":
        return [[n] for n in _load().names_for(label_names or [])]
    path = Path(spec)
    if not path.is_file():
        raise MissingFileError(f"data.classnames: '{spec}' is neither 'imagenet' nor an existing file with one "
                                f"class name per line")
    rows = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    names = [[s.strip() for s in r.split("|") if s.strip()] for r in rows]
    if label_names and len(names) != len(label_names):
        raise DataError(f"data.classnames: '{spec}' lists {len(names)} classes but the data has {len(label_names)}")
    return names
