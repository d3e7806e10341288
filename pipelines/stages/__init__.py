"""What runs on the data, in its order: read -> prompt -> generate -> parse -> account -> write.

Each stage maps one row in to exactly one row out (`pipelines.stages.base`); `processor` composes them.
"""
