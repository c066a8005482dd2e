"""Speaking an exported model: `synthesizer` loads the file and speaks one sentence, `long_text` splits text of
any length and streams its audio in bounded memory, `server` answers HTTP requests with it."""
