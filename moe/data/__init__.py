"""Text, chat and preference data into packed token rows: the Grain pipeline (pipeline.py),
the tokenizer (tokenizer.py), chat rendering with its loss mask (chat.py) and the chat and
preference pipeline (chat_data.py)."""
