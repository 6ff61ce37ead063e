"""The paper's scores (Sec. 5): CLIP-T, CLIP-I, optional DINO, and their composite.

Every score is a raw cosine in [-1, 1] between L2-normalized features (`SCORE_CONVENTION`). AlignIT's
numbers use CLIPScore = 2.5 * max(cos, 0) and are not comparable to these.
"""

import math
import re

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (AutoImageProcessor, AutoModel, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer,
                          ViTConfig, ViTImageProcessorPil, ViTModel)

from ..config import TINY_RESOLUTION

SCORE_CONVENTION = "raw cosine (not 2.5x CLIPScore)"
COMPOSITE_EPS = 1e-6  # cosines <= 0 are clamped here so the log in `composite` stays finite
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO
IMAGENET_STD = (0.229, 0.224, 0.225)


def placeholder_pattern(tokens) -> re.Pattern:
    # longest first, so "[V10]" wins over "[V1]" and "sks1" over "sks"; a token edge that is a word
    # character must not touch another one ("sks" is not found in "sksx"), punctuation may ("[V1]'s")
    tokens = sorted(set(tokens), key=len, reverse=True)
    if not tokens or "" in tokens:
        raise ValueError(f"placeholder tokens must be non-empty strings, got {tokens!r}")
    return re.compile("|".join((r"(?<!\w)" if re.match(r"\w", t[0]) else "") + re.escape(t)
                               + (r"(?!\w)" if re.match(r"\w", t[-1]) else "") for t in tokens))


def replace_placeholders(prompt: str, mapping: dict[str, str]) -> str:
    """'A [V1] by [V10].' with {"[V1]": "cat", "[V10]": "dog"} -> 'A cat by dog.' (the clean prompt)."""
    if not mapping:
        return prompt
    return placeholder_pattern(mapping).sub(lambda m: mapping[m.group(0)], prompt)


def placeholders_in(prompt: str, tokens) -> list[str]:
    """The `tokens` that occur in `prompt`, each once, in order of first appearance."""
    return list(dict.fromkeys(m.group(0) for m in placeholder_pattern(tokens).finditer(prompt)))


def composite(clip_t: float, clip_i: float, weight_text: float = 1.0, weight_image: float = 1.0) -> float:
    """Weighted geometric mean exp((wt log ct + wi log ci) / (wt + wi)); cosines <= 0 count as COMPOSITE_EPS.

    NaN inputs give NaN (a failed score must not look like a poor one)."""
    if weight_text < 0 or weight_image < 0 or weight_text + weight_image <= 0:
        raise ValueError(f"composite weights must be >= 0 with a positive sum, got {weight_text}, {weight_image}")
    t, i = max(clip_t, COMPOSITE_EPS), max(clip_i, COMPOSITE_EPS)  # max(nan, eps) is nan
    return math.exp((weight_text * math.log(t) + weight_image * math.log(i)) / (weight_text + weight_image))


def _tiny_clip():
    from ..families.tiny import build_tokenizer
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(**layers, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(**layers, image_size=TINY_RESOLUTION, patch_size=8),
        projection_dim=16,
    )
    processor = CLIPImageProcessorPil(size={"shortest_edge": TINY_RESOLUTION},
                                      crop_size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION},
                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return CLIPModel(config), processor, tokenizer


def _tiny_dino():
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                               image_size=TINY_RESOLUTION, patch_size=8))
    processor = ViTImageProcessorPil(size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION},
                                     image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return model, processor


def _preprocessing(prefix: str, p) -> dict:
    size = p.crop_size if p.do_center_crop else p.size
    return {f"{prefix}_processor": type(p).__name__, f"{prefix}_resolution": f"{size['height']}x{size['width']}",
            f"{prefix}_mean": list(p.image_mean), f"{prefix}_std": list(p.image_std)}


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b.T).mean().item()  # [N, D] @ [D, M]: all pairs; rows are unit vectors


class Scorer:
    """CLIP (and optionally DINO) features, L2-normalized, compared by raw cosine.

    `clip_model` / `dino_model`: a hub id, a local directory, or "tiny" (toy models built in code, seed 0).
    Preprocessing always uses transformers' PIL backend, so scores don't depend on torchvision being installed.
    """

    def __init__(self, clip_model: str = "openai/clip-vit-base-patch32", dino_model: str | None = None,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.clip_id, self.dino_id = clip_model, dino_model
        if clip_model == "tiny":
            self.clip_model, self.clip_processor, self.tokenizer = _tiny_clip()
        else:  # dtype: transformers 5 defaults to "auto" (checkpoint dtype); scores are computed in fp32
            self.clip_model = CLIPModel.from_pretrained(clip_model, dtype=torch.float32)
            self.clip_processor = AutoImageProcessor.from_pretrained(clip_model, backend="pil")
            self.tokenizer = CLIPTokenizer.from_pretrained(clip_model)
        self.clip_model.to(self.device).eval()
        self.dino_model = self.dino_processor = None
        if dino_model == "tiny":
            self.dino_model, self.dino_processor = _tiny_dino()
        elif dino_model is not None:
            self.dino_model = AutoModel.from_pretrained(dino_model, dtype=torch.float32)
            self.dino_processor = AutoImageProcessor.from_pretrained(dino_model, backend="pil")
        if self.dino_model is not None:
            self.dino_model.to(self.device).eval()

    def describe(self) -> dict:
        """Checkpoints, convention and preprocessing: log these beside the scores."""
        out = {"score_convention": SCORE_CONVENTION, "clip_model": self.clip_id, "dino_model": self.dino_id,
               **_preprocessing("clip", self.clip_processor)}
        if self.dino_processor is not None:
            out.update(_preprocessing("dino", self.dino_processor))
        return out

    @torch.inference_mode()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, D] unit-norm CLIP image embeddings (after the visual projection)."""
        pixels = self.clip_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        # transformers 5: a BaseModelOutputWithPooling whose pooler_output is the projected embedding
        return F.normalize(self.clip_model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """[N, D] unit-norm CLIP text embeddings (EOS token, after the text projection)."""
        max_length = self.clip_model.config.text_config.max_position_embeddings  # 77; truncation keeps EOS
        ids = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = self.clip_model.get_text_features(input_ids=ids.input_ids.to(self.device),
                                                attention_mask=ids.attention_mask.to(self.device))
        return F.normalize(out.pooler_output.float(), dim=-1)

    @torch.inference_mode()
    def dino_features(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, D] unit-norm DINO CLS features (last layer, after the final norm)."""
        pixels = self.dino_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return F.normalize(self.dino_model(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)

    def clip_t(self, images: list[Image.Image], text: str) -> float:
        """Mean raw cosine between each image and `text`."""
        return _mean_cosine(self.image_features(images), self.text_features([text]))

    def clip_i(self, images: list[Image.Image], references: list[Image.Image]) -> float:
        """Mean raw CLIP cosine over all (image, reference) pairs."""
        return _mean_cosine(self.image_features(images), self.image_features(references))

    def dino(self, images: list[Image.Image], references: list[Image.Image]) -> float | None:
        """Mean raw DINO cosine over all (image, reference) pairs; None without a DINO model."""
        if self.dino_model is None:
            return None
        return _mean_cosine(self.dino_features(images), self.dino_features(references))

    def score(self, images: list[Image.Image], clean_prompt: str, references: list[list[Image.Image]],
              elements: tuple[str, ...] = (), weight_text: float = 1.0, weight_image: float = 1.0) -> dict:
        """All scores of one set of samples.

        `references[k]` are subject k's input images: CLIP-I / DINO are scored per subject against its own
        set (`clip_i/<k>`, `dino/<k>` when there are several) and averaged into `clip_i` / `dino`.
        `clip_t` is against the clean prompt; `clip_t/<element>` against each prompt element (Table 2).
        """
        if not images:
            raise ValueError("score: no images to score")
        if not references or not all(references):
            raise ValueError("score: give one non-empty list of reference images per subject")
        feats = self.image_features(images)  # [N, D], shared by every score below
        texts = self.text_features([clean_prompt, *elements])  # [1 + E, D]
        text_scores = (feats @ texts.T).mean(0).tolist()  # mean over images, per text
        out = {"clip_t": text_scores[0]}
        out.update({f"clip_t/{e}": s for e, s in zip(elements, text_scores[1:])})
        per_subject = {"clip_i": [_mean_cosine(feats, self.image_features(refs)) for refs in references]}
        if self.dino_model is not None:
            dino_feats = self.dino_features(images)
            per_subject["dino"] = [_mean_cosine(dino_feats, self.dino_features(refs)) for refs in references]
        for name, values in per_subject.items():
            out[name] = sum(values) / len(values)
            if len(values) > 1:
                out.update({f"{name}/{k}": v for k, v in enumerate(values)})
        out["composite"] = composite(out["clip_t"], out["clip_i"], weight_text, weight_image)
        return out
