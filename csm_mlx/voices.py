"""The voice presets: a model repo's own prompt clips (prompts/NAME.wav, with its transcript in
prompts/NAME.txt, as Marvis's repos ship them), and the six clips of the sesame/csm-1b repo, which
any CSM model can take as context."""

from pathlib import Path
from typing import Dict, Optional

# The voice prompts of the sesame/csm-1b repo (prompts/NAME.wav) and the reference demo's transcripts.
VOICES: Dict[str, str] = {
    "conversational_a": (
        "like revising for an exam I'd have to try and like keep up the momentum because I'd "
        "start really early I'd be like okay I'm gonna start revising now and then like "
        "you're revising for ages and then I just like start losing steam I didn't do that "
        "for the exam we had recently to be fair that was a more of a last minute scenario "
        "but like yeah I'm trying to like yeah I noticed this yesterday that like Mondays I "
        "sort of start the day with this not like a panic but like a"
    ),
    "conversational_b": (
        "like a super Mario level. Like it's very like high detail. And like, once you get "
        "into the park, it just like, everything looks like a computer game and they have all "
        "these, like, you know, if, if there's like a, you know, like in a Mario game, they "
        "will have like a question block. And if you like, you know, punch it, a coin will "
        "come out. So like everyone, when they come into the park, they get like this little "
        "bracelet and then you can go punching question blocks around."
    ),
    "read_speech_a": (
        "And Lake turned round upon me, a little abruptly, his odd yellowish eyes, a little like those of "
        "the sea eagle, and the ghost of his smile that flickered on his singularly pale face, with a stern "
        "and insidious look, confronted me."
    ),
    "read_speech_b": (
        "He was such a big boy that he wore high boots and carried a jack knife. He gazed and gazed at the "
        "cap, and could not keep from fingering the blue tassel."
    ),
    "read_speech_c": (
        "All passed so quickly, there was so much going on around him, the Tree quite forgot to look to himself."
    ),
    "read_speech_d": (
        "Suddenly I was back in the old days Before you felt we ought to drift apart. It was some trick-the "
        "way your eyebrows raise."
    ),
}


def model_voices(model_dir: Optional[Path]) -> Dict[str, str]:
    """Name -> transcript of the prompt clips beside a model: each prompts/NAME.wav whose
    transcript is in prompts/NAME.txt or, for csm-1b's clips, in VOICES."""
    voices = {}
    for clip in sorted(model_dir.glob("prompts/*.wav")) if model_dir is not None else []:
        text = clip.with_suffix(".txt")
        try:
            transcript = " ".join(text.read_text(encoding="utf-8").split()) if text.is_file() else VOICES.get(clip.stem)
        except (OSError, UnicodeDecodeError):
            transcript = None  # an unreadable transcript: the clip cannot be a prompt
        if transcript:
            voices[clip.stem] = transcript
    return voices


def presets(model_dir: Optional[Path]) -> Dict[str, str]:
    """Name -> transcript of every voice preset a model has: its own clips, then csm-1b's six
    (fetched from the sesame/csm-1b repo when first used), which any CSM model can take as context."""
    own = model_voices(model_dir)
    return {**own, **{name: text for name, text in VOICES.items() if name not in own}}
