
kill -TERM $P; wait $P
echo "VMLAB pci_command=$(pci_command $D)"
dump journal /tmp/journal.jsonl; dump agent-log /tmp/agent.log
dmesg > /tmp/dmesg.txt; dump dmesg /tmp/dmesg.txt
