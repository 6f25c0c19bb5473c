"""Pure-logic pieces of issue 4: energy labels, sensor readers, TFLite inspection of bad input."""

import os

import pytest

from edge_agent import energy, sensors
from edge_agent.ml import tflite_info


def test_estimated_energy_names_its_model():
    e = energy.estimate("Raspberry Pi 4 Model B Rev 1.4", threads=1, latency_ms=2.0)
    # 2.7 W idle + (6.4 - 2.7) W x 1/4 busy cores = 3.625 W; x 2 ms = 7.25 mJ
    assert e["label"] == "estimated" and e["per_inference_mj"] == pytest.approx(7.25)
    assert "pidramble" in e["model"] and "idle 2.7 W" in e["model"]
    assert energy.estimate("Raspberry Pi 4 Model B", threads=8, latency_ms=1.0)["power_w"] == pytest.approx(6.4)


def test_unknown_board_is_not_available_never_zero():
    e = energy.estimate(None, threads=1, latency_ms=2.0)
    assert e["label"] == "not available" and e["per_inference_mj"] is None
    e = energy.estimate("AMD EPYC laptop", threads=1, latency_ms=2.0)
    assert e["per_inference_mj"] is None


def test_measured_energy():
    e = energy.measured([2.0, 3.0], latency_ms=4.0, source="hwmon:ina219")
    assert e == {"label": "measured", "per_inference_mj": 10.0, "power_w": 2.5, "samples": 2, "sensor": "hwmon:ina219"}


def fake_sysfs(root, temp_milli=48500, micro_w=3_250_000, battery=True):
    z = root / "class/thermal/thermal_zone0"
    z.mkdir(parents=True)
    (z / "type").write_text("cpu-thermal\n")
    (z / "temp").write_text(f"{temp_milli}\n")
    h = root / "class/hwmon/hwmon0"
    h.mkdir(parents=True)
    (h / "name").write_text("ina219\n")
    (h / "power1_input").write_text(f"{micro_w}\n")
    f = root / "devices/system/cpu/cpu0/cpufreq"
    f.mkdir(parents=True)
    (f / "scaling_cur_freq").write_text("1500000\n")
    (f / "cpuinfo_max_freq").write_text("1800000\n")
    if battery:
        b = root / "class/power_supply/BAT0"
        b.mkdir(parents=True)
        for k, v in {
            "type": "Battery",
            "status": "Discharging",
            "capacity": "87",
            "voltage_now": "3900000",
            "current_now": "500000",
        }.items():
            (b / k).write_text(v + "\n")
    return root


def test_sensor_readers_on_a_fake_sysfs(tmp_path):
    root = str(fake_sysfs(tmp_path))
    assert sensors.cpu_temp_c(root) == pytest.approx(48.5)
    assert sensors.cpu_freq_mhz(root) == 1500.0 and sensors.cpu_max_freq_mhz(root) == 1800.0
    assert sensors.power_w(root) == (pytest.approx(3.25), "hwmon:ina219")
    bat = sensors.power_supplies(root)[0]
    assert bat["capacity_pct"] == 87 and bat["power_w"] == pytest.approx(1.95)
    inv = sensors.inventory(root)
    assert (
        inv["thermal_zones"] == ["cpu-thermal"] and inv["power_sensors"] == ["ina219"] and inv["batteries"] == ["BAT0"]
    )


def test_no_sensors_means_none_not_zero(tmp_path):
    root = str(tmp_path)
    assert sensors.cpu_temp_c(root) is None and sensors.cpu_freq_mhz(root) is None
    assert sensors.power_w(root) == (None, None)


def test_tflite_inspection_refuses_non_tflite():
    with pytest.raises(tflite_info.NotTFLite):
        tflite_info.weight_sparsity(b"not a model at all")
    with pytest.raises(tflite_info.NotTFLite):
        tflite_info.weight_sparsity(b"\x00\x00\x00\x00TFL3" + os.urandom(64))  # right identifier, garbage body
    assert not tflite_info.is_tflite(b"PK\x03\x04")
