"""Where data lives and how it is reached: object storage, OpenAI batch files, the response cache, metrics."""
