import requests

from conftest import shape_image


def test_server_classifies_a_generated_image(server, trained_model):
    labels = open(f"{trained_model}/labels.txt").read().split()
    answer = requests.post(server.url + "/", files={"data": ("x.jpg", shape_image("red_circle", 1))}).json()
    assert [pair[0] for pair in answer] and all(pair[0] in labels for pair in answer)
