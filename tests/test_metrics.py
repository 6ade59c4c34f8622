import pytest

from cl_runner.metrics import (
    all_metrics,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    learning_accuracy,
)

# R[i][j]: accuracy on task j after training task i (written by hand)
R = [
    [0.90, 0.20, 0.10],
    [0.60, 0.80, 0.30],
    [0.50, 0.70, 0.95],
]
INIT = [0.10, 0.25, 0.20]


def test_acc_is_mean_of_last_row():
    assert average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)


def test_bwt_is_negative_when_tasks_are_forgotten():
    # (0.50 - 0.90) + (0.70 - 0.80) over the T-1 = 2 earlier tasks
    assert backward_transfer(R) == pytest.approx((-0.40 - 0.10) / 2)
    assert backward_transfer(R) < 0


def test_bwt_positive_when_later_training_helps():
    better = [[0.5, 0.0], [0.7, 0.9]]
    assert backward_transfer(better) == pytest.approx(0.2)


def test_fwt_uses_the_entry_just_before_training_and_the_initial_model():
    # R[0][1] - b[1], R[1][2] - b[2]
    assert forward_transfer(R, INIT) == pytest.approx(((0.20 - 0.25) + (0.30 - 0.20)) / 2)


def test_forgetting_is_max_earlier_minus_final_excluding_last_task():
    # task 0: max(0.90, 0.60) - 0.50 = 0.40; task 1: max(0.20, 0.80) - 0.70 = 0.10; task 2 excluded
    assert forgetting(R) == pytest.approx((0.40 + 0.10) / 2)


def test_forgetting_takes_the_maximum_not_the_diagonal():
    # task 0 peaks after task 1 (0.95 > 0.60 on the diagonal)
    m = [[0.60, 0.1, 0.1], [0.95, 0.8, 0.1], [0.70, 0.8, 0.9]]
    assert forgetting(m) == pytest.approx(((0.95 - 0.70) + (0.8 - 0.8)) / 2)
    assert backward_transfer(m) == pytest.approx(((0.70 - 0.60) + 0.0) / 2)


def test_learning_accuracy_is_mean_of_diagonal():
    assert learning_accuracy(R) == pytest.approx((0.90 + 0.80 + 0.95) / 3)


def test_single_task_leaves_transfer_undefined():
    m = all_metrics([[0.7]], [0.1])
    assert m == {"acc": 0.7, "bwt": None, "fwt": None, "forgetting": None, "learning_accuracy": 0.7}


def test_non_square_matrix_is_refused():
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2]])


def test_intransigence_is_joint_diagonal_minus_own_diagonal():
    from cl_runner.metrics import intransigence

    # joint reference J trained on tasks 0..k at stage k (hand-written): its diagonal is 0.95, 0.90, 0.97
    J = [[0.95, 0.30, 0.20], [0.93, 0.90, 0.25], [0.92, 0.88, 0.97]]
    # (0.95 - 0.90) + (0.90 - 0.80) + (0.97 - 0.95), over T = 3 tasks
    assert intransigence(R, J) == pytest.approx((0.05 + 0.10 + 0.02) / 3)
    assert intransigence(J, J) == 0.0
    # a method that learns each new task better than the reference has negative intransigence
    assert intransigence(J, R) == pytest.approx(-(0.05 + 0.10 + 0.02) / 3)
    with pytest.raises(ValueError, match="tasks"):
        intransigence(R, [[0.9]])
