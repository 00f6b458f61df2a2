"""Tissue classes of the phantom and their attenuation in each phase (HU, see DOMAIN.md).

Values are drawn once per subject: ``draw_hu(rng)`` returns, per tissue id, the non-contrast and
portal-venous HU plus the amplitude (HU) of the smooth organ texture.  Pancreas parenchyma and
lesions are special: their HU come from :mod:`pdacscreen.io.phantom.render` (fat infiltration,
lesion weight), the table entries are their base values.
"""

from __future__ import annotations

import numpy as np

__all__ = ["T", "N_TISSUES", "draw_hu"]


class T:
    """Tissue ids (uint8) painted into the tissue map."""

    AIR = 0
    SFAT = 1  # subcutaneous fat
    MUSCLE = 2
    VFAT = 3  # visceral / retroperitoneal fat
    LIVER = 4
    SPLEEN = 5
    KIDNEY = 6
    GWALL = 7  # stomach and bowel wall
    GFLUID = 8  # gastric / bowel fluid
    GAS = 9
    STOOL = 10
    PANC = 11
    DUCT = 12
    PDAC = 13
    CYST = 14
    ARTERY = 15
    VEIN = 16  # portal, superior mesenteric, splenic veins
    IVC = 17
    HVEIN = 18  # hepatic veins
    CORTEX = 19  # cortical bone
    CANCELLOUS = 20
    DISC = 21
    CSF = 22
    LUNG = 23
    HEART = 24
    BILE = 25
    TABLE = 26
    RIB = 27
    SIMPLE_FLUID = 28  # renal / hepatic cysts
    CARTILAGE = 29


N_TISSUES = 30


def draw_hu(
    rng: np.random.Generator, *, fatty_liver: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-subject attenuation: (nc_hu, pv_hu, texture_hu), each shape (N_TISSUES,) float32."""
    u = rng.uniform
    blood = u(35, 50)
    nc = np.zeros(N_TISSUES, np.float32)
    pv = np.zeros(N_TISSUES, np.float32)
    tex = np.zeros(N_TISSUES, np.float32)

    def put(t, n, p=None, x=0.0):
        nc[t] = n
        pv[t] = n if p is None else p
        tex[t] = x

    fat = u(-115, -90)
    put(T.AIR, -1000.0)
    put(T.SFAT, fat, None, 5)
    put(T.VFAT, fat + u(0, 12), None, 9)
    put(T.MUSCLE, u(42, 55), u(55, 70), 4)
    liver_nc = u(25, 45) if fatty_liver else u(55, 65)
    put(T.LIVER, liver_nc, liver_nc + u(45, 58), 3)
    put(T.SPLEEN, u(45, 55), u(110, 130), 3)
    put(T.KIDNEY, u(30, 35), u(150, 195), 4)
    put(T.GWALL, u(35, 45), u(75, 100), 3)
    put(T.GFLUID, u(5, 25), None, 4)
    put(T.GAS, u(-1000, -960), None, 8)
    put(T.STOOL, u(0, 30), None, 35)
    put(T.PANC, u(35, 50), u(90, 130), 3)
    put(T.DUCT, u(5, 15), None, 2)
    put(T.PDAC, 0.0)  # computed from the parenchyma (see phantom_render)
    put(T.CYST, u(0, 15), None, 1)
    put(T.ARTERY, blood, u(150, 200), 1)
    put(T.VEIN, blood, u(150, 190), 1)
    put(T.IVC, blood, u(105, 150), 4)
    put(T.HVEIN, blood, u(140, 180), 1)
    put(T.CORTEX, u(700, 1000), None, 20)
    put(T.CANCELLOUS, u(150, 280), None, 25)
    put(T.DISC, u(70, 95), None, 4)
    put(T.CSF, u(10, 30), None, 2)
    put(T.LUNG, u(-880, -820), None, 25)
    put(T.HEART, blood + u(0, 5), u(120, 170), 4)
    put(T.BILE, u(0, 20), None, 1)
    put(T.TABLE, u(120, 250), None, 0)
    put(T.RIB, u(350, 550), None, 30)
    put(T.SIMPLE_FLUID, u(0, 15), None, 1)
    put(T.CARTILAGE, u(100, 180), None, 10)
    return nc, pv, tex
