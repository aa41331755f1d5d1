"""The built-in example (`python -m demo`): a tiny base model and a task, both made on this machine.

demo.corpus reads the data from the Python standard library; demo.base builds the tokenizer and the
base model with this project's trainer; demo.__main__ runs train.run on them.
"""
