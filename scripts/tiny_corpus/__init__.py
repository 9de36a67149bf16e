"""Hand-written source text for the embedded tiny model and chat data set (see scripts/build_tiny.py).

`facts` holds the one fictional business every text agrees on; `chat` turns authored questions and
answers about it into the fine-tuning conversations; `prose` holds the pretraining text (handbook,
everyday prose, dialogues on other topics), which never contains the chat set itself.
"""
