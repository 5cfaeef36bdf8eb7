"""The tokenizer of the tiny test/demo models: the real one cannot be downloaded here, so `build_tokenizer()`
trains a small byte-fallback BPE with the Phi-3 special tokens (`<|user|>`, `<|end|>`, `<|image|>`, ...)
and the same normalizer, BOS template and decoder as the official tokenizer.json.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<|image|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\n' -}}{% endif %}"
)

# Words a product catalog uses; anything else still encodes through the byte-fallback tokens.
_WORDS = [
    "product",
    "category",
    "full",
    "price",
    "what",
    "is",
    "shown",
    "in",
    "this",
    "image",
    "compare",
    "these",
    "two",
    "products",
    "name",
    "one",
    "brand",
    "black",
    "white",
    "beige",
    "camel",
    "navy",
    "red",
    "green",
    "pink",
    "grey",
    "gray",
    "brown",
    "blue",
    "burgundy",
    "cream",
    "olive",
    "yellow",
    "orange",
    "purple",
    "tan",
    "ivory",
    "charcoal",
    "khaki",
    "silver",
    "gold",
    "honey",
    "stone",
    "sand",
    "archive",
    "dark",
    "light",
    "pale",
    "leather",
    "cashmere",
    "wool",
    "cotton",
    "silk",
    "nylon",
    "canvas",
    "suede",
    "denim",
    "linen",
    "check",
    "quilted",
    "knit",
    "plain",
    "striped",
    "monogram",
    "vintage",
    "printed",
    "embroidered",
    "logo",
    "classic",
    "mini",
    "small",
    "medium",
    "large",
    "heritage",
    "trench",
    "bag",
    "tote",
    "shoulder",
    "crossbody",
    "clutch",
    "backpack",
    "scarf",
    "shawl",
    "coat",
    "jacket",
    "parka",
    "puffer",
    "trench",
    "shirt",
    "polo",
    "t-shirt",
    "dress",
    "skirt",
    "sweater",
    "cardigan",
    "hoodie",
    "sneaker",
    "sneakers",
    "boot",
    "boots",
    "loafer",
    "heels",
    "sandal",
    "hat",
    "cap",
    "beanie",
    "bucket",
    "belt",
    "wallet",
    "card",
    "case",
    "purse",
    "keychain",
    "umbrella",
    "blanket",
    "poncho",
    "cape",
    "gloves",
    "sunglasses",
    "BAGS",
    "SCARVES",
    "OUTERWEAR",
    "SHOES",
    "ACCESSORIES",
    "WOMAN",
    "MAN",
    "KIDS",
    "TOTE",
    "SHOULDER",
    "CROSSBODY",
    "COATS",
    "JACKETS",
    "SHIRTS",
    "SNEAKERS",
    "BOOTS",
    "HATS",
    "CAPS",
    "BELTS",
    "WALLETS",
    "KNITWEAR",
    "CASHMERE",
    "PONCHOS",
    "CAPES",
    "N.A.",
    "USD",
    "EUR",
]


def _corpus() -> list[str]:
    lines = [" ".join(_WORDS[i : i + 8]) for i in range(0, len(_WORDS), 8)]
    lines += [w.capitalize() for w in _WORDS] + [w.upper() for w in _WORDS]
    lines += ["\nProduct: Beige Check Cashmere Scarf, Category: SCARVES, Full Price: 590.0"] * 20
    lines += [f"{n}.0 ${n:,} {n} USD" for n in range(0, 5000, 37)]
    return lines


VOCAB_SIZE = 1000  # the BPE vocabulary a preset trains, before the special tokens


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A Llama-style byte-fallback BPE tokenizer with Phi-3's special tokens, deterministic."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,  # the context of Phi-3-V, as its official tokenizer_config.json says
    )
