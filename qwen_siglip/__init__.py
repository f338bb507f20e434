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
    preferences  stage 3's data: preference pairs (TRL, RLAIF-V) and GRPO prompts with their reference answer
    pair_collator  DPO batches: the prompt once, the completion exactly as SFT labels it
    rewards      GRPO's reward functions: exact match, length/format, yours by module:function
    trainer      what each stage adds to its TRL trainer
    training     the stage machinery, and stages 1 and 2 (`train_pretrain.py`, `train_sft.py`)
    stage3       DPO and GRPO on that machinery (`train_dpo.py`, `train_grpo.py`)
    inference    loading a checkpoint to answer with: remote-code policy, revision, context length
    metrics      exact match, BLEU-4, CIDEr-D
    evaluation   held-out scores beside blind baselines (`evaluate_vlm.py`)
    gallery      the held-out page: scored examples in one self-contained HTML file (`evaluate_vlm.py --html`)
    chat         the app's chat engine, streamed (`app.py`)
    llava        the conversion to transformers' LLaVA (`export_llava.py`)
    gguf_text    the LM half of the GGUF export: llama.cpp's qwen2, tokenizer, chat template, end ids
    gguf_vision  the vision half of the GGUF export: the tower and projector as llama.cpp's mmproj
    gguf_export  the GGUF export itself (`export_gguf.py`): checks, files, llama.cpp's quantiser, card, push
    synthetic    the embedded default's coloured-shapes world and its held-out splits (`quickstart.py`)
    shapes_stage3  stage 3 on that world: pairs and prompts from training scenes, the hallucination metric
    tiny         tiny random bases saved like Hub checkpoints, for the quickstart and the tests
    cli          how the commands end on an error: a user's mistake as its message alone, a bug with its traceback
"""
