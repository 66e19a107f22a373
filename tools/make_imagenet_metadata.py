"""Write visrep/data/imagenet_metadata.json: the 1000 ImageNet-1k classes for CLIP zero-shot.

    .venv/bin/python tools/make_imagenet_metadata.py      # needs open_clip_torch and timm installed

The file is committed; this script only says where its facts come from, so it can be checked:
  wnids        -- the ImageNet-1k synset ids in class-index order (sorted, the ILSVRC-2012 order),
                  from timm's packaged ``imagenet_synsets.txt``;
  lemmas       -- WordNet's lemmas of each synset (timm's ``imagenet_synset_to_lemma.txt``);
  classnames   -- the cleaned class names of OpenAI's CLIP zero-shot notebook (MIT licence), as
                  open_clip packages them;
  templates    -- "openai_imagenet": the 80 prompt templates of the same notebook;
                  "simple_imagenet": the 7-template subset of the CLIP paper's Sec. 3.1.4 ensemble.
"""
import json
from importlib import resources
from pathlib import Path

from open_clip import zero_shot_metadata as z

info = resources.files("timm.data") / "_info"
wnids = (info / "imagenet_synsets.txt").read_text().split()
lemma = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines() if line)
assert len(wnids) == 1000 == len(z.IMAGENET_CLASSNAMES) and wnids == sorted(wnids)
out = {
    "source": "wnids/lemmas: timm (Apache-2.0); classnames and templates: OpenAI CLIP notebook (MIT) via open_clip",
    "wnids": wnids,
    "lemmas": [lemma[w].strip() for w in wnids],
    "classnames": list(z.IMAGENET_CLASSNAMES),
    "templates": {
        "openai_imagenet": [t("{}") for t in z.OPENAI_IMAGENET_TEMPLATES],
        "simple_imagenet": [t("{}") for t in z.SIMPLE_IMAGENET_TEMPLATES],
    },
}
path = Path(__file__).resolve().parent.parent / "visrep" / "data" / "imagenet_metadata.json"
path.write_text(json.dumps(out, indent=0, ensure_ascii=False) + "\n")
print(f"wrote {path} ({path.stat().st_size} bytes)")
