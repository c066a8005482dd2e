"""BitTTS: JETS acoustic model + HiFi-GAN vocoder trained end to end with 1.58-bit QAT (ternq)."""
__version__ = "0.1.0"
