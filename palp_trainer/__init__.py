import logging

# diffusers' pipelines import transformers' `CLIPImageProcessor`; without torchvision (the CPU install)
# transformers falls back to the PIL processor, which is what we use anyway (scoring.py imports the Pil classes),
# and logs two lines about it on the first import: they would precede every one-line error on stderr.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
