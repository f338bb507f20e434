"""The qwen-siglip trainer and its tools. The model itself is the three Hub files at the repo's top level
(`configuration_`, `modeling_`, `processing_qwen_siglip.py`), which import only torch and transformers; this
package imports them, never the other way round. One job per module, from the bottom up:

    images       the one image opener (no `datasets`, no torch): decode, make RGB, turn upright, or refuse
    records      every record format -> TRL's conversational messages, each field checked
    sources      files, folders, `save_to_disk` folders and Hub ids -> raw records
    data         the datasets training and evaluation read: checked at load, images decoded per example
    collator     batches with labels on the assistant's tokens only; truncation never cuts an image
    packing      padding-free and packed batches, length-grouped padded batches
    compose      a fresh model and processor from two pretrained bases (stage 1's start)
    hub          Hub ids, display names, the filtered upload
    card         the model card, the loss plot, evaluation results as model-index
    checkpoints  resume from the newest complete checkpoint
    trainer      what each stage adds to its TRL trainer
    training     the stage entry points' one implementation (`train_pretrain.py`, `train_sft.py`)
    inference    loading a checkpoint to answer with: remote-code policy, revision, context length
    metrics      exact match, BLEU-4, CIDEr-D
    evaluation   held-out scores beside blind baselines (`evaluate_vlm.py`)
    gallery      the held-out page: scored examples in one self-contained HTML file (`evaluate_vlm.py --html`)
    chat         the app's chat engine, streamed (`app.py`)
    llava        the conversion to transformers' LLaVA (`export_llava.py`)
    synthetic    the embedded default's coloured-shapes world and its held-out splits (`quickstart.py`)
    tiny         tiny random bases saved like Hub checkpoints, for the quickstart and the tests
"""
