from .registration import REGISTRATION_CONFIGS, RegistrationInferTask, is_registration_bundle

__all__ = ["REGISTRATION_CONFIGS", "RegistrationInferTask", "is_registration_bundle"]
