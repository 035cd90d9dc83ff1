"""Quality evaluation (``python -m elise.evaluate``): intelligibility (WER/CER from a recogniser), voice
match (speaker-embedding similarity), naturalness (a MOS predictor), stopping and speed.

Building blocks other code uses: ``elise.evaluate.asr.load_asr`` and ``elise.evaluate.speaker.load_speaker_model``.
"""
