"""Phi3VProcessor: prompts with `<|image_k|>` placeholders + images -> model inputs, for a whole batch.

Like the official processor, the text is split at the placeholders and every chunk is tokenized
on its own (so a BOS also follows every image); each placeholder becomes as many `<|image|>`
ids (32044 in the real tokenizer) as the image has tokens. Unlike it, a batch of prompts, each
with its own images, is padded on the side you choose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import BatchFeature, ProcessorMixin

from productvlm.errors import UserError

PLACEHOLDER = re.compile(r"<\|image_(\d+)\|>")
IMAGE_TOKEN = "<|image|>"
TEXT_IDS_KEPT = 1024  # prompt chunks whose ids `text_ids` keeps (then it starts over)
# What the official tokenizer_config.json holds besides the fixed values `official_tokenizer_config` writes.
TOKENIZER_KEYS = (
    "added_tokens_decoder",
    "bos_token",
    "clean_up_tokenization_spaces",
    "eos_token",
    "pad_token",
    "padding_side",
    "unk_token",
)
OFFICIAL_EXTRA_SPECIAL = ["<|system|>", "<|end|>", "<|user|>", "<|end|>"]  # sic, as Microsoft ships it
# Arguments of a from_pretrained call that some transformers versions save into the files.
LOADER_ARGS = {
    "is_local", "local_files_only", "trust_remote_code", "cache_dir", "token", "use_auth_token",
    "revision", "subfolder", "_commit_hash", "force_download", "proxies", "backend", "name_or_path",
}  # fmt: skip


class Phi3VProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token = IMAGE_TOKEN
        self._text_ids: dict[str, list[int]] = {}  # `text_ids`; not saved (not an __init__ argument)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {IMAGE_TOKEN} token; Phi-3-V tokenizers have it (id 32044)"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Never runs code from the folder: trust_remote_code is dropped (AutoTokenizer would import
        the modules that tokenizer_config.json's auto_map names)."""
        kwargs.pop("trust_remote_code", None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _load_tokenizer_from_pretrained(
        cls, sub_processor_type, pretrained_model_name_or_path, subfolder="", **kwargs
    ):
        """tokenizer.json as it is, whatever tokenizer_config.json's `tokenizer_class` says: the official
        "LlamaTokenizer" would make transformers 5 rebuild the normalizer and pre-tokenizer in a folder
        without a phi3_v config.json (with one, AutoTokenizer already reads tokenizer.json as it is)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )

    def __call__(
        self,
        text: str | list[str],
        images=None,
        num_crops: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Encode one prompt (`images` = an image or a list) or a batch (`images` = one list per prompt).

        Returns `input_ids`, `attention_mask`, and when there are images `pixel_values`
        (all images of the batch in order, (n, num_crops + 1, 3, crop, crop)) and `image_sizes`.
        """
        texts, images_per_text = _as_batch(text, images)
        flat_images = [im for ims in images_per_text for im in ims]
        image_inputs = {}
        tokens_per_image: list[int] = []
        if flat_images:
            image_inputs = self.image_processor(flat_images, num_crops=num_crops, return_tensors="pt")
            tokens_per_image = list(image_inputs.pop("num_img_tokens"))

        rows, start = [], 0
        for i, (prompt, ims) in enumerate(zip(texts, images_per_text)):
            rows.append(self.encode_prompt(prompt, tokens_per_image[start : start + len(ims)], index=i))
            start += len(ims)
        batch = self.pad(rows, padding_side or self.tokenizer.padding_side)
        batch.update(image_inputs)
        return BatchFeature(batch, tensor_type=return_tensors)

    def encode_prompt(self, prompt: str, tokens_per_image: list[int], index: int = 0) -> list[int]:
        """Token ids of one prompt; placeholder k becomes tokens_per_image[k-1] image ids."""
        check_placeholders(prompt, len(tokens_per_image), index)
        ids: list[int] = []
        for i, chunk in enumerate(PLACEHOLDER.split(prompt)[::2]):
            if i:
                ids += [self.image_token_id] * tokens_per_image[i - 1]
            ids += self.text_ids(chunk)
        return ids

    def text_ids(self, text: str) -> list[int]:
        """The tokenizer's ids of a prompt chunk, kept for the next row: a catalog's rows mostly share one
        prompt, and tokenizing it again for every photo cost a tenth of `predict`'s time per row."""
        ids = self._text_ids.get(text)
        if ids is None:
            if len(self._text_ids) >= TEXT_IDS_KEPT:
                self._text_ids.clear()
            ids = self._text_ids[text] = self.tokenizer(text).input_ids
        return ids

    def pad(self, rows: list[list[int]], side: str) -> dict:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        longest = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(longest - len(r), longest) if side == "left" else slice(0, len(r))
            input_ids[i, span] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def save_pretrained(self, save_directory, **kwargs):
        """The processor files as Microsoft's repos have them, so every folder we write (RUN/final,
        checkpoints, exports) loads in transformers 4.x and Microsoft's processor too: `LlamaTokenizer`
        and the official fields in tokenizer_config.json (no loader arguments, the chat template inline),
        special_tokens_map.json, preprocessor_config.json with the image settings, processor_config.json
        naming the class."""
        saved = super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        self.image_processor.save_pretrained(folder)
        tokenizer = official_tokenizer_config(folder, self.tokenizer.chat_template or self.chat_template)
        write_json(folder / "tokenizer_config.json", tokenizer)
        special = {
            k: _special_token(tokenizer[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        special["additional_special_tokens"] = OFFICIAL_EXTRA_SPECIAL
        write_json(folder / "special_tokens_map.json", special)
        image = drop_loader_args(read_json(folder / "preprocessor_config.json"))
        write_json(folder / "preprocessor_config.json", {**image, "processor_class": "Phi3VProcessor"})
        write_json(folder / "processor_config.json", {"processor_class": "Phi3VProcessor"})
        return saved

    def num_image_tokens(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Image tokens of a width x height image, from its size alone (for budgeting)."""
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height, num_crops=num_crops)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


def check_placeholders(prompt: str, n_images: int, index: int = 0) -> None:
    """Placeholders must be <|image_1|> .. <|image_n|>, in order, one per image."""
    where = f"prompt {index}"
    if IMAGE_TOKEN in prompt:
        raise UserError(
            f"{where} contains the reserved token {IMAGE_TOKEN}; write <|image_1|>, <|image_2|>, ..."
        )
    numbers = [int(n) for n in PLACEHOLDER.findall(prompt)]
    if numbers != list(range(1, len(numbers) + 1)):
        found = ", ".join(f"<|image_{n}|>" for n in numbers)
        raise UserError(
            f"{where} has placeholders {found}: they must be <|image_1|>..<|image_n|> in order, no gaps"
        )
    if len(numbers) != n_images:
        raise UserError(f"{where} has {len(numbers)} image placeholder(s) but {n_images} image(s) were given")


def official_tokenizer_config(folder: Path, chat_template: str | None) -> dict:
    """tokenizer_config.json in the official shape, from the one transformers just wrote in `folder`."""
    written = read_json(folder / "tokenizer_config.json")
    config = {
        **{k: written[k] for k in TOKENIZER_KEYS if k in written},
        "add_bos_token": _adds_bos(folder),
        "add_eos_token": False,
        "additional_special_tokens": OFFICIAL_EXTRA_SPECIAL,
        "legacy": False,
        "model_max_length": written.get("model_max_length"),
        "processor_class": "Phi3VProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
    }
    if isinstance(chat_template, str):
        config["chat_template"] = chat_template
    return config


def _adds_bos(folder: Path) -> bool:
    """Whether tokenizer.json's post-processor puts BOS first (transformers 4.x rebuilds the post-processor
    of a LlamaTokenizerFast from `add_bos_token`, so it must say what the file does)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tokenizer.encode("a").ids
    return bool(ids) and ids[0] == tokenizer.token_to_id("<s>")


def _special_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def drop_loader_args(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in LOADER_ARGS}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _as_batch(text, images) -> tuple[list[str], list[list]]:
    if isinstance(text, str):
        if images is None:
            return [text], [[]]
        return [text], [list(images) if isinstance(images, (list, tuple)) else [images]]
    texts = list(text)
    if images is None:
        return texts, [[] for _ in texts]
    if len(images) != len(texts):
        raise UserError(
            f"{len(texts)} prompts but {len(images)} image lists: give one list (or None) per prompt"
        )
    per_text = [
        [] if ims is None else list(ims) if isinstance(ims, (list, tuple)) else [ims] for ims in images
    ]
    return texts, per_text


__all__ = ["Phi3VProcessor", "check_placeholders", "LOADER_ARGS", "drop_loader_args"]
