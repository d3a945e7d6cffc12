"""The student and teacher a loss or a training method uses but does not own."""


class HoldsStudentTeacher:
    """A mixin for the modules that use a student and a teacher without owning them: both are held by reference,
    not as submodules, so the holder's parameters(), state_dict(), .to() and .train() leave them alone."""

    def hold(self, student, teacher):
        self._models = (student, teacher)

    @property
    def student(self):
        return self._models[0]

    @property
    def teacher(self):
        return self._models[1]
