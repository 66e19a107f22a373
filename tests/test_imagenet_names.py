"""Bundled ImageNet-1k class names and CLIP's prompt templates (visrep.data.imagenet), and their use from a
pair dataset's config (``data.classnames imagenet``, ``data.zero_shot_templates openai_imagenet``)."""
import json

import numpy as np
import pytest
from PIL import Image

from visrep.checks import ConfigError
from visrep.data.imagenet import IMAGENET, TEMPLATE_SETS, expand_templates, read_classnames, template_set
from visrep.data.pairs import PairsConfig, load_pair_splits
from visrep.errors import DataError, MissingFileError


def test_the_bundled_classes_are_imagenet_1k_in_index_order():
    assert len(IMAGENET.wnids) == len(set(IMAGENET.wnids)) == len(IMAGENET.classnames) == len(IMAGENET.lemmas) == 1000
    assert list(IMAGENET.wnids) == sorted(IMAGENET.wnids)  # ILSVRC-2012 class ids are the sorted synsets
    # well-known indices of the ILSVRC-2012 label space
    assert (IMAGENET.wnids[0], IMAGENET.classnames[0]) == ("n01440764", "tench")
    assert (IMAGENET.wnids[1], IMAGENET.classnames[1]) == ("n01443537", "goldfish")
    assert (IMAGENET.wnids[207], IMAGENET.classnames[207]) == ("n02099601", "Golden Retriever")
    assert IMAGENET.wnids[999] == "n15075141" and IMAGENET.lemmas[999].startswith("toilet tissue")
    assert all(n.strip() == n and n for n in IMAGENET.classnames)


def test_template_sets():
    openai, simple = template_set("openai_imagenet"), template_set("simple_imagenet")
    assert len(openai) == 80 and len(simple) == 7 and set(simple) <= set(openai)
    assert all(t.count("{}") == 1 for t in openai)
    assert "a photo of a {}." in openai and "itap of a {}." in simple
    assert expand_templates(["a {} here", "simple_imagenet"]) == ["a {} here"] + simple
    assert set(TEMPLATE_SETS) == {"openai_imagenet", "simple_imagenet"}
    with pytest.raises(ConfigError, match="unknown template set 'clip80'"):
        template_set("clip80")


def test_names_for_synset_folders_class_labels_and_integer_labels(tmp_path):
    imagenette = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
                  "n03425413", "n03445777", "n03888605"]
    assert IMAGENET.names_for(imagenette)[:2] == ["tench", "English Springer Spaniel"]
    assert IMAGENET.names_for(list(IMAGENET.lemmas)) == list(IMAGENET.classnames)  # a 1000-class ClassLabel
    assert IMAGENET.names_for([]) == list(IMAGENET.classnames)  # integer labels, no names
    with pytest.raises(DataError, match="got 1000 labels"):  # 1000 classes that are not ImageNet's
        IMAGENET.names_for([f"class {i}" for i in range(1000)])
    with pytest.raises(DataError, match="synset ids .* such as \\['cat'"):
        IMAGENET.names_for(["cat", "dog"])
    f = tmp_path / "names.txt"
    f.write_text("cat | kitty\n\ndog\n")
    assert read_classnames(str(f), ["0", "1"]) == [["cat", "kitty"], ["dog"]]
    with pytest.raises(DataError, match="lists 2 classes but the data has 3"):
        read_classnames(str(f), ["0", "1", "2"])
    with pytest.raises(MissingFileError, match="neither 'imagenet' nor an existing file"):
        read_classnames(str(tmp_path / "nope.txt"), None)


def test_a_pair_folder_of_synset_labels_gets_clip_names_and_templates(tmp_path):
    wnids = ["n01440764", "n01443537", "n02099601"]
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i in range(12):
            file = tmp_path / "img" / f"{i}.png"
            file.parent.mkdir(exist_ok=True)
            Image.fromarray((np.random.default_rng(i).random((8, 8, 3)) * 255).astype(np.uint8)).save(file)
            f.write(json.dumps({"file": f"img/{i}.png", "caption": f"photo {i}", "label": wnids[i % 3]}) + "\n")
    cfg = PairsConfig(source="folder", data_dir=str(tmp_path), label_column="label", classnames="imagenet",
                      zero_shot_templates=["simple_imagenet", "a blurry photo of a {}."], val_fraction=0.25,
                      test_fraction=0.25)
    cfg.validate("data.")
    ps = load_pair_splits(cfg)
    assert ps.classnames == [["tench"], ["goldfish"], ["Golden Retriever"]]  # label ids follow the sorted wnids
    assert ps.templates == template_set("simple_imagenet") + ["a blurry photo of a {}."]
    with pytest.raises(ConfigError, match="zero_shot_templates"):
        PairsConfig(zero_shot_templates=["no placeholder"]).validate("data.")
