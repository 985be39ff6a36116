"""The one img2img call both sides of the optimum comparison make (imported by the test in
sdtrt's venv and by the optimum script in its own)."""

PROMPT = "a red circle on a blue background"
CALL = {"strength": 0.6, "num_inference_steps": 10, "guidance_scale": 8.0, "output_type": "np"}
SEED = 7
