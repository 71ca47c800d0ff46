qcom-reset check > /tmp/check.txt 2>&1; dump check /tmp/check.txt
qcom-reset status $D > /tmp/status.txt 2>&1; dump status /tmp/status.txt
