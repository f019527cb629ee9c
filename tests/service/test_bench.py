"""The bench's ratios from its figures (no model, no server: `test_service_e2e` runs the bench itself)."""

from service.bench import HF_BATCH_1, OURS_BATCH_1, PAIRED, Figures, ratios


def test_each_server_is_compared_with_the_rounds_it_was_paired_with():
    figures = [Figures(HF_BATCH_1, 5.0, [200.0]), Figures(OURS_BATCH_1, 10.0, [100.0])]
    for backend, hf_ms, ours_ms, server_ms in (("torch", 150.0, 100.0, 120.0), ("vllm", 300.0, 200.0, 400.0)):
        name = f"server {backend}, 1 client"
        figures += [Figures(name, 1.0, [999.0]), Figures(f"server {backend}, 16 clients", 30.0, [999.0])]
        prefix = PAIRED.format(backend)
        figures += [Figures(prefix + HF_BATCH_1, 1000 / hf_ms, [hf_ms, hf_ms]),
                    Figures(prefix + OURS_BATCH_1, 1000 / ours_ms, [ours_ms, ours_ms]),
                    Figures(prefix + name, 1000 / server_ms, [server_ms, server_ms])]
    lines = ratios(figures)
    assert "server torch: 16 clients: 4.50x the captions/s of transformers batch 1 (paired measurement's)" in lines
    assert "server vllm: 16 clients: 9.00x the captions/s of transformers batch 1 (paired measurement's)" in lines
    torch_1 = next(line for line in lines if line.startswith("server torch: 1 client, paired over 2 rounds"))
    assert "p50 0.80x transformers batch 1" in torch_1 and "server overhead +20 %" in torch_1
    vllm_1 = next(line for line in lines if line.startswith("server vllm: 1 client, paired over 2 rounds"))
    assert "p50 1.33x transformers batch 1" in vllm_1 and "server overhead +100 %" in vllm_1
