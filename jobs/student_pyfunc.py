"""A vidkd student as an MLflow pyfunc model, written as a model from code: `jobs.registry` logs
this file with the student as its artifact, and MLflow runs it when the model is loaded.

Input: a DataFrame with a `text` column (captions -> text embeddings), or `frames` and
`frame_mask` columns (a clip as the feature table stores it; the `frames_codec` param says how)
-> video embeddings. Output: float32 [N, D], L2-normalised.
"""

import mlflow
import numpy as np


class StudentModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from core.student import load_student_model

        (student,) = context.artifacts.values()  # the one artifact: a checkpoint file or quantized directory
        self.student = load_student_model(student)

    # no type hints: MLflow would read them as an input schema; the logged signature is the schema
    def predict(self, context, model_input, params=None):
        import torch

        from core import features

        if "text" in model_input and model_input["text"].notna().all():
            with torch.no_grad():
                return self.student.encode_text(list(model_input["text"])).float().numpy()
        codec = (params or {}).get("frames_codec", "jpeg")
        f, s = self.student.num_frames, self.student.image_size
        frames = features.decode_frames(list(model_input["frames"]), codec, (f, s, s, 3))
        mask = features.stack_bytes(list(model_input["frame_mask"]), "uint8", (f,))
        with torch.no_grad():
            out = self.student.encode_video(torch.from_numpy(frames), torch.from_numpy(np.array(mask)))
        return out.video_emb.float().numpy()


mlflow.models.set_model(StudentModel())
