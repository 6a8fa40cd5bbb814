"""Voice chat: speech recognition, a language model and CSM, with the whole conversation as CSM's context.

    from csm_mlx import CSM
    from csm_mlx.chat import Recognizer, Responder, VoiceChat
    csm = CSM.load()
    chat = VoiceChat(csm, Recognizer.load(), Responder.load(), csm.voice("conversational_a"))
    text = chat.hear(user_audio)           # 24 kHz float32: the user's turn
    for chunk in chat.reply(text):         # the answer's audio, as it is generated
        ...
"""

from ..recognizer import Recognizer, RecognizerError
from .responder import Responder, ResponderError
from .voice_chat import Reply, VoiceChat

__all__ = ["Recognizer", "RecognizerError", "Reply", "Responder", "ResponderError", "VoiceChat"]
