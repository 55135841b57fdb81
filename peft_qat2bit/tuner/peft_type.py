"""The ``PeftType`` member of the QAT LoRA method, added to PEFT's enum at import time."""

from peft.utils.peft_types import PeftType


def add_peft_type(name: str) -> PeftType:
    """Add ``name`` to PEFT's ``PeftType`` enum (a ``str`` enum) and return the member.

    A second call with the same name returns the existing member.

    PEFT lists its methods in a closed enum, and ``register_peft_method`` rejects a name that is not
    a member. Python has no public API to extend an enum, so the member is built the way ``EnumType``
    builds one and entered in the three tables it reads: ``PeftType[name]`` (``_member_map_``),
    ``PeftType(value)`` (``_value2member_map_``) and iteration (``_member_names_``).
    """
    # NOTE: this relies on the private tables of enum.EnumType. It is tested on CPython 3.11 with PEFT 0.21.
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # The attribute is set before the member is entered, since EnumType rejects reassigning a member.
    setattr(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


QAT2BIT_LORA = add_peft_type("QAT2BIT_LORA")
