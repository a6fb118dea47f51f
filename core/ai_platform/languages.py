"""Language tags → English names, for prompts (models follow "French" better than "fr")."""

from __future__ import annotations

_NAMES = {
    "ar": "Arabic", "bn": "Bengali", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek",
    "en": "English", "es": "Spanish", "fa": "Persian", "fi": "Finnish", "fr": "French", "he": "Hebrew",
    "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese",
    "ko": "Korean", "ms": "Malay", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "sv": "Swedish", "sw": "Swahili", "th": "Thai", "tr": "Turkish",
    "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
}  # fmt: skip


def language_name(tag: str) -> str:
    """``"pt-BR"`` → ``"Portuguese (pt-BR)"``; unknown tags are returned as given."""
    primary = tag.split("-")[0].lower()
    name = _NAMES.get(primary)
    if name is None:
        return tag
    return name if primary == tag.lower() else f"{name} ({tag})"
